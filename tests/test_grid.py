"""``seqcpo reproduce``: a tiny grid runs end to end, resumes after an interruption without redoing finished
stages, reports every arm, and the shipped grid files load and dry-run."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import make_tiny_llama, make_toy_tokenizer
from seqcpo.grid import GridError, load_grid, run_grid

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid_assets")
    tok = make_toy_tokenizer()
    model_dir = root / "tiny"
    make_tiny_llama(vocab_size=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    words = ["river", "market", "bridge", "city", "wool", "salt", "square", "bread"]
    data = root / "train.jsonl"
    with open(data, "w") as fh:
        for i in range(40):
            a, b = words[i % 8], words[(3 * i + 1) % 8]
            fh.write(json.dumps({"id": f"r{i}", "instruction": f"Describe the {a}.", "context": "",
                                 "response": f"The {a} is by the {b}.", "category": "cat" + str(i % 2)}) + "\n")
    return {"model": str(model_dir), "data": str(data)}


def _grid(assets, tmp_path, **eval_over):
    grid = {
        "name": "tiny",
        "out_dir": str(tmp_path / "out"),
        "base": {
            "model_name_or_path": assets["model"], "dataset": assets["data"], "task": "instruction",
            "prompt_template": "plain", "validation_size": 2, "test_size": 6, "max_steps": 2,
            "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "no",
            "report_to": "none", "use_cpu": True, "disable_tqdm": True, "dataloader_num_workers": 0, "seed": 0,
        },
        "arms": {
            "base": {"train": False},
            "mle": {"objective": "mle"},
            "cpo": {"objective": "cpo_ranked", "negatives": "tn:1,bn:1", "num_negatives": 2},
        },
        "ensembles": [{"from": "mle", "to": "cpo", "alphas": [0, 0.5]}],
        "eval": {"num_examples": 4, "decoding": ["greedy"], "max_new_tokens": 6, "batch_size": 4,
                 "judge": {"backend": "local", "model": assets["model"]}, "mauve": "minilm", **eval_over},
    }
    path = tmp_path / "grid.yaml"
    path.write_text("# seqcpo reproduce grid.yaml\n" + yaml.safe_dump(grid, sort_keys=False))
    return str(path)


@pytest.fixture
def fake_minilm(monkeypatch):
    """Deterministic 8-d text features instead of loading all-MiniLM-L6-v2 (seconds, and not under test)."""
    import zlib

    from seqcpo.evaluation import metrics

    def features(texts, **kw):
        return np.stack([np.random.default_rng(zlib.crc32(t.encode())).normal(size=8) for t in texts]).astype("float32")

    monkeypatch.setattr(metrics, "minilm_features", features)


def _mtimes(out):
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in Path(out).rglob("done.json")}


def test_grid_runs_resumes_after_interruption_and_reports_every_arm(assets, tmp_path, monkeypatch, fake_minilm):
    from seqcpo.evaluation import generate as eval_generate
    from seqcpo.training import run as training_run

    grid = _grid(assets, tmp_path)
    out = tmp_path / "out"
    real_train = training_run.train
    trained = []

    def failing_train(cfg):
        if cfg.objective == "cpo_ranked":
            raise RuntimeError("power cut")
        trained.append(cfg.objective)
        return real_train(cfg)

    monkeypatch.setattr(training_run, "train", failing_train)
    with pytest.raises(RuntimeError, match="power cut"):
        run_grid(grid)
    assert trained == ["mle"]
    assert (out / "arms" / "mle" / "done.json").is_file() and (out / "arms" / "mle" / "generate" / "done.json").is_file()
    assert not (out / "arms" / "cpo" / "done.json").exists()
    before = _mtimes(out)

    # the rerun trains only the arm that failed; finished stages keep their done.json untouched
    trained.clear()
    monkeypatch.setattr(training_run, "train", lambda cfg: (trained.append(cfg.objective), real_train(cfg))[1])
    report = run_grid(grid)
    assert trained == ["cpo_ranked"]
    after = _mtimes(out)
    for key, t in before.items():
        assert after[key] == t, f"{key} was redone"

    results = json.loads((out / "results.json").read_text())
    labels = [r["label"] for r in results["runs"]]
    assert labels == ["base", "mle", "cpo", "mle~cpo@0", "mle~cpo@0.5"]
    for r in results["runs"]:
        wr = r["win_rate_vs_gold"]
        assert wr["n"] + wr["failed"] == 4
        assert 0 <= wr["ci_low"] <= wr["rate"] <= wr["ci_high"] <= 1
        assert r["mauve"]["n_p"] == r["mauve"]["n_q"] == 4
        assert 0 <= r["rouge_l"] <= 1
    h2h = {h["a"]: h for h in results["head_to_head"]}
    assert set(h2h) == {"base", "cpo", "mle~cpo@0", "mle~cpo@0.5"} and all(h["b"] == "mle" for h in h2h.values())
    # alpha 0 is bitwise the MLE model: greedy generations equal MLE's, so every head-to-head item ties
    assert h2h["mle~cpo@0"]["win_rate"]["rate"] == 0.5
    compute = results["grid"]["compute"]
    assert compute["mle"]["train_steps"] == 2 and compute["cpo"]["train_steps"] == 2
    assert compute["base"]["train_steps"] == 0 and compute["mle"]["generate_seconds"] >= 0
    assert compute["mle~cpo@0.5"]["ensemble_seconds"] is not None
    assert compute["mle~cpo@0"]["generations_copied_from"] == "mle"  # alpha 0 is bitwise the MLE model
    assert compute["mle~cpo@0.5"]["generations_copied_from"] is None
    text = Path(report).read_text()
    assert text.splitlines()[2] == f"Regenerate this report (finished stages are skipped): `seqcpo reproduce {grid}`"
    assert "the local judge is weak" in text and "| mle~cpo@0.5 |" in text and "MAUVE (n gold/model)" in text
    assert "alpha_sweep.png" in results["plots"] and (out / "winrate.png").is_file()

    # a third run redoes nothing: no training, no generation, same done.json files
    def no_generation(*a, **k):
        raise AssertionError("generation should have been skipped")

    monkeypatch.setattr(eval_generate, "generate_continuations", no_generation)
    monkeypatch.setattr("seqcpo.evaluation.generate_continuations", no_generation)
    trained.clear()
    done_before = _mtimes(out)
    run_grid(grid)
    assert trained == [] and _mtimes(out) == done_before


def test_changed_training_config_is_an_error_and_eval_changes_redo_evaluation(assets, tmp_path, fake_minilm):
    grid = _grid(assets, tmp_path, judge="none", mauve="none")
    raw = yaml.safe_load(open(grid))
    raw["arms"] = {"mle": {"objective": "mle"}}
    raw.pop("ensembles")
    Path(grid).write_text(yaml.safe_dump(raw))
    run_grid(grid)
    out = tmp_path / "out"
    eval_done = (out / "arms/mle/evaluate/done.json").stat().st_mtime_ns
    gen_done = (out / "arms/mle/generate/done.json").stat().st_mtime_ns
    raw["eval"]["order"] = "random"  # an evaluation option: only the evaluation is redone
    Path(grid).write_text(yaml.safe_dump(raw))
    run_grid(grid)
    assert (out / "arms/mle/generate/done.json").stat().st_mtime_ns == gen_done
    assert (out / "arms/mle/evaluate/done.json").stat().st_mtime_ns != eval_done
    raw["base"]["learning_rate"] = 5e-4  # a training option: refuse to mix old results with a new config
    Path(grid).write_text(yaml.safe_dump(raw))
    with pytest.raises(GridError, match="arm 'mle' was trained with another config"):
        run_grid(grid)


def test_a_data_file_or_model_folder_changed_under_finished_stages_is_refused(assets, tmp_path, fake_minilm):
    """Defect (campaign 3): stage fingerprints hash the grid's settings, which name the data and the model by path,
    so a data file edited in place (or a model folder rewritten) left every stage "done already" and the report
    mixed old results with the new content. The content is now recorded (inputs.json) and a change refused."""
    data, model = tmp_path / "data.jsonl", tmp_path / "model"
    shutil.copy(assets["data"], data)
    shutil.copytree(assets["model"], model)
    grid = _grid({"model": str(model), "data": str(data)}, tmp_path, judge="none", mauve="none")
    raw = yaml.safe_load(open(grid))
    raw["arms"] = {"base": {"train": False}}
    raw["eval"]["baseline"] = "base"
    raw.pop("ensembles")
    Path(grid).write_text(yaml.safe_dump(raw))
    run_grid(grid)
    recorded = json.loads((tmp_path / "out" / "inputs.json").read_text())
    assert set(recorded) == {f"dataset {data}", f"model_name_or_path {model}"}
    original = data.read_text()
    data.write_text(original.replace("river", "harbour"))  # same rows and ids, other text
    with pytest.raises(GridError, match=rf"dataset {re.escape(str(data))} changed since this grid's finished stages"):
        run_grid(grid)
    with pytest.raises(GridError, match="changed since"):
        run_grid(grid, dry_run=True)  # the dry run says so too
    data.write_text(original)
    run_grid(grid)  # restored: every stage is skipped
    make_tiny_llama(vocab_size=len(make_toy_tokenizer()), seed=5).save_pretrained(model)  # other weights, same path
    with pytest.raises(GridError, match=rf"model_name_or_path {re.escape(str(model))} changed since"):
        run_grid(grid)


def test_dry_run_prints_the_plan_and_runs_nothing(assets, tmp_path, capsys):
    grid = _grid(assets, tmp_path)
    report = run_grid(grid, dry_run=True)
    plan = capsys.readouterr().out
    assert report.endswith("report.md") and not (tmp_path / "out").exists()
    assert "mle~cpo@0.5" in plan and "objective=cpo_ranked" in plan and "train todo" in plan
    run_grid(grid, only=["mle"], dry_run=True)
    assert "- cpo" in capsys.readouterr().out


def test_grid_errors_name_the_key(assets, tmp_path):
    grid = _grid(assets, tmp_path)
    raw = yaml.safe_load(open(grid))
    raw["arms"]["cpo"]["betta"] = 0.2
    Path(grid).write_text(yaml.safe_dump(raw))
    with pytest.raises(GridError, match="arm 'cpo'.*unknown field 'betta'.*'beta'"):
        load_grid(grid)
    raw["arms"]["cpo"].pop("betta")
    raw["ensembles"][0]["to"] = "nope"
    Path(grid).write_text(yaml.safe_dump(raw))
    with pytest.raises(GridError, match=r"ensembles\[0\].to: 'nope' is not a trained arm"):
        load_grid(grid)
    raw["ensembles"] = []
    raw["eval"]["judgee"] = "none"
    Path(grid).write_text(yaml.safe_dump(raw))
    with pytest.raises(GridError, match="unknown key 'judgee'.*did you mean 'judge'"):
        load_grid(grid)
    raw["eval"].pop("judgee")
    Path(grid).write_text(yaml.safe_dump(raw))
    with pytest.raises(GridError, match="--only: nope not in the grid"):
        run_grid(grid, only=["nope"], dry_run=True)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*grid*.yaml")))
def test_shipped_grid_files_load_and_dry_run(name, capsys, monkeypatch, tmp_path):
    path = REPO / "configs" / name
    first = path.read_text().splitlines()[0]
    assert first.startswith("# seqcpo reproduce configs/"), "each grid starts with the command that runs it"
    monkeypatch.chdir(tmp_path)  # out_dir is relative: nothing is written into the repository
    grid = load_grid(path)
    assert grid.eval.baseline in [a.name for a in grid.arms]
    run_grid(path, dry_run=True)
    assert "arms:" in capsys.readouterr().out


def test_cli_reproduce_dry_run(assets, tmp_path, capsys):
    from seqcpo.cli import main

    grid = _grid(assets, tmp_path)
    assert main(["reproduce", grid, "--dry-run"]) == 0
    assert "grid 'tiny'" in capsys.readouterr().out
    assert main(["reproduce", str(tmp_path / "missing.yaml")]) == 2


def test_only_runs_a_subset_and_an_ensemble_needs_its_endpoints(assets, tmp_path):
    grid = _grid(assets, tmp_path, judge="none", mauve="none")
    report = run_grid(grid, only=["mle"])
    out = tmp_path / "out"
    assert (out / "arms/mle/evaluate/done.json").is_file() and not (out / "arms/cpo").exists()
    text = Path(report).read_text()
    assert "`seqcpo reproduce" in text and "--only mle`" in text
    assert "not evaluated yet: base, cpo, mle~cpo@0, mle~cpo@0.5" in text
    with pytest.raises(GridError, match="ensemble 'mle~cpo' needs arm 'cpo' trained first"):
        run_grid(grid, only=["mle~cpo"])


def test_a_grid_sets_every_judge_option(assets, tmp_path):
    """Every JudgeConfig field can be set in a grid's eval.judge, arrives typed, and reaches the judge."""
    import dataclasses

    from seqcpo.evaluation.config import JudgeConfig

    every = {"backend": "openai", "model": "gpt-x", "url": "http://127.0.0.1:9/v1", "api_key_env": "MY_KEY",
             "prompt": None, "concurrency": 3, "max_retries": 2, "timeout": 7.5, "max_tokens": 0,
             "cache": str(tmp_path / "jc"), "debias": False, "tie_margin": 0.25, "note": "a test judge"}
    assert set(every) == {f.name for f in dataclasses.fields(JudgeConfig)}, "a JudgeConfig field is not covered"
    grid = _grid(assets, tmp_path, judge=every, order="random", order_seed=3)
    g = load_grid(grid)
    assert dataclasses.asdict(g.eval.judge) == every and (g.eval.order, g.eval.order_seed) == ("random", 3)
    from seqcpo.grid.state import GridRun

    judge = GridRun(g, set()).judge()
    assert (judge.max_concurrency, judge.max_retries, judge.timeout, judge.max_tokens) == (3, 2, 7.5, None)
    assert judge.api_key_env == "MY_KEY" and judge.host == "127.0.0.1:9" and str(judge.cache.path).startswith(every["cache"])

    local = dict(backend="local", model=assets["model"], debias=False, tie_margin=0.25, note="n")
    g = load_grid(_grid(assets, tmp_path, judge=local))
    judge = GridRun(g, set()).judge()
    assert (judge.debias, judge.tie_margin) == (False, 0.25) and g.eval.judge.uses_log_odds is False
    # the judge options enter the evaluation fingerprint: changing one redoes the evaluation
    r1 = GridRun(g, set()).grid.eval.scoring_key()
    g2 = load_grid(_grid(assets, tmp_path, judge={**local, "tie_margin": 0.5}))
    assert g2.eval.scoring_key() != r1
    for bad, match in [({"tie_margin": -1}, r"tie_margin': -1.0 must be >= 0"),
                       ({"debias": "maybe"}, r"debias': 'maybe' is not valid"),
                       ({"concurrency": 0}, r"concurrency': 0 must be >= 1"),
                       ({"tie_margn": 1}, r"unknown field 'tie_margn' \(did you mean 'tie_margin'")]:
        with pytest.raises(GridError, match=match):
            load_grid(_grid(assets, tmp_path, judge={**local, **bad}))


def test_grid_eval_counts_and_out_dir_are_validated(assets, tmp_path):
    for over, match in [({"num_examples": -1}, r"eval: field 'num_examples': -1 must be >= 0"),
                        ({"batch_size": 0}, r"eval: field 'batch_size': 0 must be >= 1"),
                        ({"models": ["x"]}, r"unknown key 'models'"),
                        ({"mauve": "model"}, r"eval.mauve: choose minilm or none")]:
        with pytest.raises(GridError, match=match):
            load_grid(_grid(assets, tmp_path, **over))
    path = _grid(assets, tmp_path)
    raw = yaml.safe_load(open(path))
    (tmp_path / "afile").write_text("x")
    raw["out_dir"] = str(tmp_path / "afile")
    Path(path).write_text(yaml.safe_dump(raw))
    with pytest.raises(GridError, match=r"out_dir .*afile: is a file, not a folder"):
        load_grid(path)
    raw["out_dir"], raw["ensembles"] = str(tmp_path / "out"), [{"from": "mle", "to": "cpo", "alphas": [0, "nan"]}]
    Path(path).write_text(yaml.safe_dump(raw))
    with pytest.raises(GridError, match=r"ensembles\[0\]: field 'alphas\[1\]': 'nan' is not valid"):
        load_grid(path)


def test_a_grid_judge_that_cannot_load_fails_before_training(assets, tmp_path):
    grid = _grid(assets, tmp_path, judge={"backend": "local", "model": str(tmp_path / "no-such-judge")})
    with pytest.raises(GridError, match=r"eval.judge: --judge-model .*no-such-judge: not a loadable checkpoint"):
        run_grid(grid)
    assert not (tmp_path / "out" / "arms").exists()


def _claims_grid(assets, tmp_path):
    grid = {
        "name": "tiny-claims",
        "out_dir": str(tmp_path / "out"),
        "base": {
            "model_name_or_path": assets["model"], "dataset": assets["data"], "task": "instruction",
            "prompt_template": "plain", "validation_size": 0, "test_size": 8, "max_steps": 3,
            "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "no",
            "report_to": "none", "use_cpu": True, "disable_tqdm": True, "dataloader_num_workers": 0,
        },
        "arms": {
            "mle": {"objective": "mle", "seeds": [0, 1]},
            "cpo": {"objective": "cpo", "negatives": "tn:1,bn:1", "num_negatives": 2, "seeds": [0, 1]},
            "anr": {"objective": "cpo_ranked", "negatives": "an", "num_negatives": 2, "offline_negatives": True,
                    "an_max_new_tokens": 4, "seed": 0},
        },
        "ensembles": [{"from": "mle", "to": "cpo", "alphas": [0.5]}],
        "eval": {"num_examples": 8, "decoding": ["greedy", "sample:temperature=1.0,top_p=0.95"],
                 "max_new_tokens": 6, "batch_size": 8, "judge": "none", "mauve": "minilm"},
        "paired": {"resamples": 200, "mauve_resamples": 3},
    }
    path = tmp_path / "grid.yaml"
    path.write_text("# seqcpo reproduce grid.yaml\n" + yaml.safe_dump(grid, sort_keys=False))
    return str(path)


def test_grid_claims_seeds_fixed_negatives_separation_and_resume(assets, tmp_path, monkeypatch, fake_minilm):
    """The resolved grid's machinery end to end on a tiny model: seeds expand into arms, an arm's fixed negatives
    are made once as a stage, every arm gets paired intervals against MLE per decoding (claims table), seed
    spread, the separation column and curves, compute per stage; a rerun redoes nothing."""
    from seqcpo.training import run as training_run
    from seqcpo.training.separation import SeparationMonitor

    real_train, monitors = training_run.train, []

    def train(cfg):  # every training run carries the separation monitor
        result = real_train(cfg)
        monitors.append(any(isinstance(c, SeparationMonitor) for c in result["trainer"].callback_handler.callbacks))
        return result

    monkeypatch.setattr(training_run, "train", train)
    grid = _claims_grid(assets, tmp_path)
    g = load_grid(grid)
    assert [a.name for a in g.arms] == ["mle", "mle.s1", "cpo", "cpo.s1", "anr", "mle~cpo@0.5"]
    assert g.arm("cpo.s1").overrides["seed"] == 1 and g.arm("cpo.s1").seed_group == "cpo"
    assert g.arm("anr").overrides["negatives_path"] == str(tmp_path / "out" / "negatives" / "anr")
    report = Path(run_grid(grid))
    assert monitors == [True] * 5
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    text = report.read_text()

    # fixed negatives: a stage of their own, made before training, its cost in the compute table
    assert (out / "negatives/anr/manifest.json").is_file() and (out / "negatives/anr/done.json").is_file()
    compute = results["grid"]["compute"]
    assert compute["anr"]["negatives_seconds"] >= 0 and compute["mle"]["negatives_seconds"] is None
    assert compute["cpo.s1"]["train_steps"] == 3 and compute["cpo.s1"]["seed"] == 1

    # per-item scores: one per test item, the means they average to
    run = next(r for r in results["runs"] if r["label"] == "cpo" and r["decoding"] == "greedy")
    assert len(run["per_item"]["id"]) == 8 and len(run["per_item"]["similarity"]) == 8
    assert np.isclose(np.mean(run["per_item"]["rouge_l"]), run["rouge_l"])
    # the paired MAUVE of the full set is the MAUVE the runs table shows
    mle_run = next(r for r in results["runs"] if r["label"] == "mle" and r["decoding"] == "greedy")

    # paired differences against MLE: every other arm, both decodings, every metric with an ordered interval
    paired = results["grid"]["paired"]
    assert set(paired) == {"mle.s1", "cpo", "cpo.s1", "anr", "mle~cpo@0.5"}
    # a seeded arm is paired with the baseline's arm of the same seed; the others with the baseline
    assert {a: p["vs"] for a, p in paired.items()} == {"mle.s1": "mle", "cpo": "mle", "cpo.s1": "mle.s1",
                                                       "anr": "mle", "mle~cpo@0.5": "mle"}
    for arm, p in paired.items():
        by_dec = p["by_decoding"]
        assert set(by_dec) == {r["decoding"] for r in results["runs"]} and len(by_dec) == 2
        for dec, diffs in by_dec.items():
            assert {"rep_3", "rep_4", "rouge_l", "similarity", "distinct_2", "mauve"} <= set(diffs)
            for d in diffs.values():
                assert d["low"] <= d["high"] and d["n"] == 8
                assert np.isclose(d["difference"], d["a"] - d["b"])
    assert np.isclose(paired["cpo"]["by_decoding"]["greedy"]["mauve"]["b"], mle_run["mauve"]["score"])
    assert np.isclose(paired["cpo"]["by_decoding"]["greedy"]["rouge_l"]["a"], run["rouge_l"])
    assert "## Claims: every difference against `mle` with its interval" in text
    section = text.split("## Claims")[1].split("\n## ")[0]
    claims = [ln for ln in section.splitlines() if ln.startswith("| cpo | mle | ")]
    assert sum(ln.startswith("| cpo.s1 | mle.s1 | ") for ln in section.splitlines()) == 2 * 6
    assert len(claims) == 2 * 6  # two decodings x six metrics
    assert claims and all(ln.endswith("| significant at 95% |") or ln.endswith("| not resolved |") for ln in claims)
    assert any("MAUVE vs gold (set, resampled)" in ln for ln in claims)

    # seed spread for both seeded arms; separation column and curves
    spread = results["grid"]["seed_spread"]
    assert set(spread) == {"mle", "cpo"} and spread["cpo"]["greedy"]["rouge_l"]["n"] == 2
    assert "## Seed spread" in text and "| cpo (cpo, cpo.s1) |" in text
    # the headline difference replicated over seed pairs (cpo - mle, cpo.s1 - mle.s1)
    diff = results["grid"]["seed_spread_of_difference"]["cpo"]
    assert diff["pairs"] == ["cpo - mle", "cpo.s1 - mle.s1"] and diff["greedy"]["rep_3"]["n"] == 2
    by = {a: paired[a]["by_decoding"]["greedy"]["rep_3"]["difference"] for a in ("cpo", "cpo.s1")}
    assert np.isclose(diff["greedy"]["rep_3"]["mean"], (by["cpo"] + by["cpo.s1"]) / 2)
    assert "| cpo - mle per seed pair (cpo - mle, cpo.s1 - mle.s1) |" in text
    training = results["grid"]["training"]
    assert {"cpo", "cpo.s1", "anr"} <= set(training) and "mle" not in training  # MLE has no pairwise signal
    assert [s for s, _ in training["cpo"]["curves"]["rewards/accuracies"]] == [1, 2, 3]
    assert "separated at step" in text and "## When the negatives stopped teaching" in text
    assert "separation.png" in results["plots"] and (out / "separation.png").stat().st_size > 1000

    # a rerun redoes no stage (negatives, training, generation, evaluation, paired bootstrap)
    def no_training(cfg, *a, **k):
        raise AssertionError("a finished stage was redone")

    monkeypatch.setattr(training_run, "train", no_training)
    monkeypatch.setattr(training_run, "make_negatives", no_training)
    before = _mtimes(out)
    run_grid(grid)
    assert _mtimes(out) == before and any(k.startswith("arms/cpo/paired") for k in before)


def test_seeds_judge_arms_paired_and_offline_negatives_are_checked(assets, tmp_path):
    path = _claims_grid(assets, tmp_path)
    raw = yaml.safe_load(open(path))
    for change, match in [
        (lambda r: r["arms"]["mle"].update(seeds=[0, 0]), r"arms.mle.seeds: give distinct training seeds"),
        (lambda r: r["arms"]["mle"].update(seed=3), r"arms.mle.seeds: .*sets no 'seed' of its own"),
        (lambda r: r["arms"]["mle"].update(seeds=["x"]), r"arms.mle: field 'seeds\[0\]': 'x' is not valid"),
        (lambda r: r.update(judge_arms=["cpo", "nope"]), r"judge_arms: nope not arms of the grid"),
        (lambda r: r.update(paired={"resamples": 0}), r"paired: resamples >= 1"),
        (lambda r: r.update(paired={"resample": 5}), r"unknown key 'resample'.*'resamples'"),
        (lambda r: r["arms"]["mle"].update(offline_negatives=True), r"offline_negatives: objective mle uses no"),
        (lambda r: r["arms"]["anr"].update(negatives_path="x"), r"arms.anr: offline_negatives makes negatives_path"),
        (lambda r: r.update(ensembles=[{"from": "mle", "to": "cpo", "name": "anr"}]),
         r"ensembles: name 'anr' is already an arm's"),
        (lambda r: r.update(ensembles=[{"from": "mle", "to": "cpo", "alphas": [a]} for a in (0.25, 0.5)]),
         r"ensembles: name 'mle~cpo' is already an arm's or another ensemble's"),
    ]:
        bad = yaml.safe_load(yaml.safe_dump(raw))
        change(bad)
        Path(path).write_text(yaml.safe_dump(bad))
        with pytest.raises(GridError, match=match):
            load_grid(path)
    Path(path).write_text(yaml.safe_dump(raw))
    with pytest.raises(GridError, match="--only: nope not in the grid"):
        run_grid(path, only=["nope"], dry_run=True)
    with pytest.raises(GridError, match="--only: name at least one arm"):  # `--only $EMPTY`: not the whole grid
        run_grid(path, only=[], dry_run=True)
    run_grid(path, only=["cpo"], dry_run=True)   # a seeds group selects all its seeds


def test_only_a_seeds_group_selects_every_seed(assets, tmp_path, capsys):
    path = _claims_grid(assets, tmp_path)
    run_grid(path, only=["cpo"], dry_run=True)
    plan = capsys.readouterr().out
    assert "   cpo " in plan and "   cpo.s1 " in plan and " - mle.s1 " in plan and "negatives todo" in plan


def _fingerprints(grid_path):
    from seqcpo.grid.state import GridRun

    grid = load_grid(grid_path)
    runner = GridRun(grid, {a.name for a in grid.arms})
    return {a.name: (runner.train_fp(a), runner.generate_fp(a), runner.evaluate_fp(a)) for a in grid.arms}


# a finished grid's stages stay finished: change these only with a commit that says why
FROZEN_TRAIN = {"base": "6241b9f1e9cc66d8", "mle": "b390149b05d22fca", "cpo": "4921206c7913a1d1",
                "mle~cpo@0": "be444e1a04eacbd7", "mle~cpo@0.5": "6c332a42cd06f488"}
FROZEN_GENERATE = {"base": "12cf2298a5ed3019", "mle": "beeb17a9f82489fe", "cpo": "7ef54326de043f8a",
                   "mle~cpo@0": "2643ea6cde92141e", "mle~cpo@0.5": "1c999a982854cd6c"}


def test_grid_fingerprints_are_frozen_and_ignore_bookkeeping(tmp_path):
    """The stage fingerprints of a fixed tiny grid are the values recorded when the resolving grid started: a
    refactor that changes them would redo (or refuse) finished arms. Logging, saving and quality-while-training
    fields are not part of what the weights depend on."""
    assets = {"model": "/models/tiny", "data": "/data/train.jsonl"}  # paths are hashed, never opened
    grid = _grid(assets, tmp_path, judge={"backend": "none"}, mauve="minilm")
    fps = _fingerprints(grid)
    raw = yaml.safe_load(open(grid))
    raw["base"].update(logging_steps=7, save_strategy="steps", save_steps=5, eval_steps=3, quality_examples=8,
                       quality_split="test", disable_tqdm=False)
    Path(grid).write_text(yaml.safe_dump(raw, sort_keys=False))
    assert _fingerprints(grid) == fps  # bookkeeping changes nothing
    raw["base"]["learning_rate"] = 2e-3
    Path(grid).write_text(yaml.safe_dump(raw, sort_keys=False))
    changed = _fingerprints(grid)
    assert changed["mle"][:2] != fps["mle"][:2] and changed["base"][:2] == fps["base"][:2]  # untrained: no lr
    assert {k: v[0] for k, v in fps.items()} == FROZEN_TRAIN
    assert {k: v[1] for k, v in fps.items()} == FROZEN_GENERATE


def test_a_clone_without_weights_redoes_only_what_needs_weights(assets, tmp_path, monkeypatch, fake_minilm, caplog):
    """A fresh clone holds the committed outputs (done.json, generations, scores, logs) but no weights: the rerun
    skips every finished stage; a stage that needs weights retrains them and gets the same weights."""
    import hashlib
    import shutil

    from seqcpo.training import run as training_run

    grid = _grid(assets, tmp_path, judge="none")
    raw = yaml.safe_load(open(grid))
    raw["arms"]["mle"]["seeds"] = [0, 1]
    Path(grid).write_text(yaml.safe_dump(raw, sort_keys=False))
    out = tmp_path / "out"
    run_grid(grid)
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
              for p in (out / "arms" / "cpo" / "final").glob("*.safetensors")}
    for weights in [*out.glob("arms/*/final"), *out.glob("arms/*/checkpoint-*"), *out.glob("ensembles/*/alpha-*")]:
        shutil.rmtree(weights)
    trained = []
    real_train = training_run.train
    monkeypatch.setattr(training_run, "train", lambda cfg: (trained.append(cfg.objective), real_train(cfg))[1])
    before = _mtimes(out)
    run_grid(grid)
    assert trained == [] and _mtimes(out) == before  # nothing redone
    # --weights: a worker makes one endpoint's weights ahead of the ensemble (another could make the other); the
    # seeds group's name makes its first seed's weights only (the ensemble's endpoint), not every seed's
    committed = {str(p): p.read_bytes() for p in (out / "arms" / "mle").rglob("*") if p.is_file()}
    run_grid(grid, only=["mle"], weights=True)
    assert trained == ["mle"] and any((out / "arms" / "mle" / "final").glob("*.safetensors"))
    assert not (out / "arms" / "mle.s1" / "final").exists()
    # the retrain ran in a scratch folder: the committed outputs (done.json, logs) are untouched and it is gone
    assert {str(p): p.read_bytes() for p in (out / "arms" / "mle").rglob("*")
            if p.is_file() and "final" not in p.parts and p.name != ".weights.lock"} == committed
    assert not (out / "arms" / "mle" / ".weights").exists()
    assert "differ" not in caplog.text  # the retrain logged the committed run's step losses
    # the ensemble's generations are gone: it needs both endpoints' weights; the missing one is trained again (its
    # committed log altered here: a machine that does not reproduce the run is said)
    shutil.rmtree(out / "arms" / "mle~cpo@0.5" / "generate")
    log = out / "arms" / "cpo" / "log_history.json"
    rows = json.loads(log.read_text())
    next(r for r in rows if "loss" in r)["loss"] += 0.5
    log.write_text(json.dumps(rows))
    run_grid(grid)
    assert "cpo: the retrain's training losses differ from the committed run's (first at (1," in caplog.text
    assert sorted(trained) == ["cpo_ranked", "mle"]
    again = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
             for p in (out / "arms" / "cpo" / "final").glob("*.safetensors")}
    assert again == digest  # deterministic on CPU: the same weights
    assert (out / "arms" / "mle~cpo@0.5" / "generate" / "done.json").is_file()
    # a worker that needs weights another worker is making waits for them and does not train them again
    import fcntl
    import threading

    shutil.copytree(out / "arms" / "mle" / "final", tmp_path / "made")
    shutil.rmtree(out / "arms" / "mle" / "final")
    with open(out / "arms" / "mle" / ".weights.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # the other worker
        waiter = threading.Thread(target=run_grid, args=(grid,), kwargs={"only": ["mle"], "weights": True})
        waiter.start()
        waiter.join(timeout=3)
        assert waiter.is_alive()  # waiting on the lock
        shutil.copytree(tmp_path / "made", out / "arms" / "mle" / "final")  # the other worker's weights land
    waiter.join(timeout=120)
    assert not waiter.is_alive() and sorted(trained) == ["cpo_ranked", "mle"]  # nothing trained again


def test_controls_and_quality_curves_reach_the_report(assets, tmp_path, fake_minilm):
    """A shuffle control gets its source's continuations on other items; a loop control its source's continuations
    cut in half and said twice, which repetition scores clearly worse; a temperature control samples the
    source's weights hot under each decoding's name; each is paired with their source and the report says which
    metrics they could move; arms trained with eval_steps get quality-over-steps curves and quality.png."""
    grid = _grid(assets, tmp_path, judge="none")
    raw = yaml.safe_load(open(grid))
    raw["base"].update(eval_steps=1, quality_examples=2, quality_embeddings=False)
    raw["controls"] = [{"name": "base.shuffled", "of": "base", "kind": "shuffle"},
                       {"of": "base", "kind": "temperature", "temperature": 3.0}, {"of": "base", "kind": "loop"}]
    Path(grid).write_text(yaml.safe_dump(raw, sort_keys=False))
    run_grid(grid)
    out = tmp_path / "out"
    gen = lambda name: {r["id"]: r for r in map(json.loads, open(out / "arms" / name / "generate" / "generations.jsonl"))}
    base, shuffled, hot, looped = gen("base"), gen("base.shuffled"), gen("base.temperature"), gen("base.loop")
    assert set(shuffled) == set(base) == set(looped) and len(base) == 4
    ids = sorted(base)
    for k, i in enumerate(ids):  # each item holds the next item's continuation
        assert shuffled[i]["generation"] == base[ids[(k + 1) % len(ids)]]["generation"]
        words, loop = base[i]["generation"].split(), looped[i]["generation"].split()
        half = (len(words) + 1) // 2
        assert loop == (words[:half] * 2)[: len(words)]  # its own first half, twice
    assert {r["decoding"] for r in hot.values()} == {"greedy"}
    results = json.loads((out / "results.json").read_text())
    controls = results["grid"]["controls"]
    assert set(controls) == {"base.shuffled", "base.temperature", "base.loop"}
    assert controls["base.loop"]["greedy"]["rep_3"]["clearly_worse"]  # a loop repeats: rep-3 can tell it
    assert results["grid"]["informative"]["greedy"]["rep_3"] and not controls["base.shuffled"]["greedy"]["rep_3"]["clearly_worse"]
    assert results["grid"]["paired"]["base.shuffled"]["vs"] == "base"
    assert all("clearly_worse" in d for d in controls["base.shuffled"]["greedy"].values())
    assert set(results["grid"]["informative"]["greedy"]) >= {"rouge_l", "distinct_2"}
    text = (out / "report.md").read_text()
    assert "Can each metric tell a worse model here?" in text and "| base.shuffled (vs base) |" in text
    # a control run alone (added to a finished grid): --only runs it from its source's finished generations
    first = (out / "arms" / "base.loop" / "generate" / "generations.jsonl").read_text()
    shutil.rmtree(out / "arms" / "base.loop")
    run_grid(grid, only=["base.loop"])
    assert (out / "arms" / "base.loop" / "generate" / "generations.jsonl").read_text() == first
    assert (out / "arms" / "base.loop" / "evaluate" / "done.json").is_file()
    # ... but never from out-of-date rows of its source (the control's fingerprint does not cover them)
    done = out / "arms" / "base" / "generate" / "done.json"
    kept = done.read_text()
    done.write_text(kept.replace(json.loads(kept)["fingerprint"], "0" * 16))
    shutil.rmtree(out / "arms" / "base.loop")
    with pytest.raises(GridError, match=r"needs arm 'base' generated again .*--only base base.loop"):
        run_grid(grid, only=["base.loop"])
    done.write_text(kept)
    training = results["grid"]["training"]
    assert [s for s, _ in training["mle"]["quality"]["quality/rouge_l"]] == [0, 1, 2]
    assert "## Quality over training steps" in text and (out / "quality.png").is_file()
    with pytest.raises(GridError, match=r"controls\[0\]\.of: 'nope' is not an arm"):
        raw["controls"] = [{"of": "nope", "kind": "shuffle"}]
        Path(grid).write_text(yaml.safe_dump(raw, sort_keys=False))
        load_grid(grid)


def _late_fingerprints(grid_path):
    """evaluate and paired fingerprints, with the baseline's generate stage finished (its fingerprint enters the
    evaluate fingerprint of a judged arm)."""
    from seqcpo.io import atomic_write_json
    from seqcpo.grid.state import GridRun

    grid = load_grid(grid_path)
    runner = GridRun(grid, {a.name for a in grid.arms})
    base = grid.arm(grid.eval.baseline)
    atomic_write_json(runner.arm_dir(base) / "generate" / "done.json",
                      {"stage": "generate", "fingerprint": runner.generate_fp(base)})
    out = {}
    for a in grid.arms:
        b = runner.paired_baseline(a)
        out[a.name] = (runner.train_fp(a), runner.generate_fp(a), runner.evaluate_fp(a),
                       None if b is None else runner.paired_fp(a, b))
    return out


# train, generate, evaluate, paired (None: the baseline is paired with nobody)
FROZEN_LATE = {
    "base": ("6241b9f1e9cc66d8", "12cf2298a5ed3019", "f3d0403a6db0f38d", "256996fa54c35031"),
    "mle": ("b390149b05d22fca", "beeb17a9f82489fe", "658cca0182999585", None),
    "cpo": ("4921206c7913a1d1", "7ef54326de043f8a", "cbe2101687e80cb6", "004a28800c09d154"),
    "mle~cpo@0": ("be444e1a04eacbd7", "2643ea6cde92141e", "2d06d36e5df9fcb5", "ae432141b4e88889"),
    "mle~cpo@0.5": ("6c332a42cd06f488", "1c999a982854cd6c", "656ba3000c914b91", "7fd6fe0e28a790b9"),
    "base.shuffle": ("94ade7a3bb8ed561", "2d335055e1979344", "604bb99d47862070", "34e75178ed3e95a0"),
    "mle.temperature": ("bcfd1cc8af531ccc", "1628811079dccc9d", "d56dd00c92556c63", "3ec1ad1531612daf"),
}


def test_grid_evaluate_and_paired_fingerprints_are_frozen(tmp_path):
    """The train, generate, evaluate and paired fingerprints of a fixed tiny grid with controls (judged by a local
    model, so the baseline's generations enter them) are those of the code the resolving grid started with."""
    assets = {"model": "/models/tiny", "data": "/data/train.jsonl"}  # paths are hashed, never opened
    grid = _grid(assets, tmp_path, judge={"backend": "local", "model": "/models/judge"}, mauve="minilm")
    raw = yaml.safe_load(open(grid))
    raw["judge_arms"] = ["cpo"]
    raw["paired"] = {"resamples": 50, "seed": 1}
    raw["controls"] = [{"of": "base", "kind": "shuffle"}, {"of": "mle", "kind": "temperature", "temperature": 3.0}]
    Path(grid).write_text(yaml.safe_dump(raw, sort_keys=False))
    assert _late_fingerprints(grid) == FROZEN_LATE


def test_cached_stage_skips_a_current_stage_and_redoes_a_changed_one(tmp_path):
    from seqcpo.grid.cache import cached_stage, read_done, write_done

    made = []

    def make(fp):
        def run():
            made.append(fp)
            return write_done(tmp_path, "s", fp, {"n": len(made)})
        return run

    assert cached_stage(tmp_path, "a", make("a"))["n"] == 1  # nothing there: made
    assert cached_stage(tmp_path, "a", make("a"))["n"] == 1 and made == ["a"]  # current: skipped
    assert cached_stage(tmp_path, "b", make("b"))["n"] == 2  # inputs changed: made again
    assert cached_stage(tmp_path, "b", make("b"), complete=lambda f: (f / "out.txt").is_file())["n"] == 3
    assert cached_stage(tmp_path, "b", make("b"), force=True)["n"] == 4 and made == ["a", "b", "b", "b"]
    assert set(read_done(tmp_path)) == {"stage", "fingerprint", "finished_utc", "n"}


def test_arm_summaries_read_the_built_config(tmp_path):
    """The report's one-line summaries take each value (defaults included) from the arm's SeqCPOConfig."""
    from seqcpo.grid.report import arm_summary

    assets = {"model": "/models/tiny", "data": "/data/train.jsonl"}
    path = _grid(assets, tmp_path, judge="none")
    raw = yaml.safe_load(open(path))
    raw["arms"].update(dpo={"objective": "dpo", "num_negatives": 1, "negatives": "tn"},
                       dflt={"objective": "cpo"}, pss={"objective": "pss"},
                       pol={"objective": "cpo", "negatives": "an", "negatives_model": "policy"})
    raw["arms"]["mle"]["seeds"] = [3, 4]
    Path(path).write_text(yaml.safe_dump(raw, sort_keys=False))
    g = load_grid(path)
    assert g.arm("dflt").config.num_negatives == 4 and g.arm("mle.s4").config.seed == 4
    summary = {a.name: arm_summary(a) for a in g.arms}
    assert summary["dflt"] == "cpo, negatives tn:2,bn:2, K=4"
    assert summary["dpo"] == "dpo, negatives tn, K=1"
    assert summary["pss"] == "pss, p_gold 0.5, passes 1"
    assert summary["pol"] == "cpo, negatives an, K=4, from the policy (refresh every 1)"
    assert summary["mle.s4"] == "mle, seed 4" and summary["base"] == "no training"
    assert summary["mle~cpo@0.5"] == "weight-space ensemble, alpha 0.5"


def test_bad_controls_name_the_entry_and_the_key(tmp_path):
    assets = {"model": "/models/tiny", "data": "/data/train.jsonl"}
    path = _grid(assets, tmp_path, judge="none")
    raw = yaml.safe_load(open(path))
    for controls, match in [
        ([{"of": "base", "kind": "hot"}], r"controls\[0\]: field 'kind': 'hot' is not one of shuffle, loop, temperature"),
        ([{"of": "base", "kind": "temperature", "temperature": 0}], r"controls\[0\]: field 'temperature': 0.0 must be > 0"),
        ([{"of": "base"}], r"controls\[0\]\.kind: choose one of shuffle, loop, temperature"),
        ([{"of": "base", "kind": "shuffle", "temp": 1}], r"controls\[0\]: unknown field 'temp'"),
        ([{"of": "base", "kind": "shuffle", "name": "mle"}], r"controls\[0\]\.name: 'mle' is already an arm"),
        ([{"of": "base", "kind": "shuffle"}] * 2, r"controls: names must be unique"),
    ]:
        Path(path).write_text(yaml.safe_dump({**raw, "controls": controls}, sort_keys=False))
        with pytest.raises(GridError, match=match) as e:
            load_grid(path)
        assert str(e.value).startswith(path) and "\n" not in str(e.value)


def test_headline_claims_claim_only_what_every_seed_pair_shows():
    """scripts/headline_claims.py: 'lower' only when every seed pair's interval is below zero, 'mixed' when some
    are, 'not resolved' when none is; metrics the controls did not show informative are left out."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("headline_claims", Path(__file__).resolve().parents[1] / "scripts" / "headline_claims.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def d(diff, low, high):
        return {"difference": diff, "low": low, "high": high}

    paired = {
        "cpo": {"vs": "mle", "by_decoding": {"greedy": {"rep_3": d(-0.08, -0.1, -0.06), "rouge_l": d(0.01, 0.002, 0.02),
                                                        "mauve": d(0.0, -0.1, 0.1), "similarity": d(0.0, -0.1, 0.1)}}},
        "cpo.s1": {"vs": "mle.s1", "by_decoding": {"greedy": {"rep_3": d(-0.07, -0.09, -0.05), "rouge_l": d(0.0, -0.01, 0.01),
                                                              "mauve": d(0.0, -0.1, 0.1), "similarity": d(0.0, -0.1, 0.1)}}},
    }
    spread = {"cpo": {"vs": "mle", "pairs": ["cpo - mle", "cpo.s1 - mle.s1"],
                      "greedy": {m: {"mean": 0.0, "std": 0.0} for m in ("rep_3", "rouge_l", "mauve", "similarity")}}}
    results = {"grid": {"paired": paired, "seed_spread_of_difference": spread, "arms": {"mle": {}, "cpo": {}, "cpo.s1": {}},
                        "informative": {"greedy": {"rep_3": True, "rouge_l": True, "mauve": True, "similarity": False}}}}
    lines = mod.claims(results, "cpo").splitlines()
    assert lines[0] == "Seeds evaluated: 2 of 2"
    rows = {line.split(" | ")[1]: line for line in lines[4:]}
    assert rows["3-gram repetition (lower: repeats less)"].endswith("| **lower** |")
    assert rows["ROUGE-L to the gold"].endswith("| mixed across seeds |")
    assert rows["MAUVE against the gold"].endswith("| not resolved |")
    assert "MiniLM cosine to the gold" not in rows  # not shown informative by a control: no row, no claim
