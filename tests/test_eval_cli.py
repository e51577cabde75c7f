"""End to end: ``seqcpo generate`` and ``seqcpo eval`` on tiny checkpoints with the local judge; and the
rule that the evaluation package never imports training code."""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_tiny_llama, make_toy_tokenizer
from seqcpo.evaluation import cli

EVAL_DIR = Path(__file__).resolve().parents[1] / "seqcpo" / "evaluation"
FORBIDDEN = ("seqcpo.training", "seqcpo.losses", "seqcpo.negatives", "seqcpo.trainer")


# tiny models run faster on one thread, and much faster on a CPU shared with other jobs
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _parser():
    parser = argparse.ArgumentParser(prog="seqcpo")
    cli.register(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(argv):
    args = _parser().parse_args(argv)
    return args.func(args)


def _save(path: Path, seed: int, alpha: float | None = None) -> str:
    tok = make_toy_tokenizer()
    make_tiny_llama(seed, vocab_size=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    if alpha is not None:
        (path / cli.ENSEMBLE_FILE).write_text(json.dumps({"alpha": alpha}))
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    records = [
        {"id": f"r{i}", "instruction": f"Name a colour number {i}.", "context": "",
         "response": "The quick brown fox.", "category": ["open_qa", "brainstorming"][i % 2]}
        for i in range(12)
    ]
    data = root / "dolly.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = root / "data.yaml"
    cfg.write_text(f"data:\n  dataset: {data}\n  task: instruction\n  validation_size: 2\n  test_size: 6\n")
    models = [_save(root / "alpha0", 0, 0.0), _save(root / "alpha1", 1, 1.0)]
    judge = _save(root / "judge", 2)
    return root, cfg, models, judge


def test_generate_then_eval_end_to_end(setup):
    root, cfg, models, judge = setup
    out = root / "out"
    common = ["--models", *models, "--labels", "A", "B", "--data-config", str(cfg), "--split", "test",
              "--num-examples", "4", "--decoding", "greedy", "sample:t=0.7", "--max-new-tokens", "5",
              "--batch-size", "4", "--out", str(out), "--no-progress"]
    assert _run(["generate", *common]) == 0
    gen_rows = (out / "generations.jsonl").read_text().splitlines()
    assert len(gen_rows) == 2 * 2 * 4
    first = json.loads(gen_rows[0])
    assert first["judge_prompt"].startswith("Name a colour number") and "### " not in first["judge_prompt"]
    assert first["prompt"] != first["judge_prompt"]  # the model saw the templated prompt

    assert _run(["eval", *common, "--judge", "local", "--judge-model", judge, "--head-to-head", "A", "B",
                 "--mauve-features", "model"]) == 0
    # eval reused the generations: nothing was appended
    assert (out / "generations.jsonl").read_text().splitlines() == gen_rows

    results = json.loads((out / "results.json").read_text())
    assert results["judge"]["backend"] == "local" and results["judge"]["model"] == judge
    assert len(results["runs"]) == 4 and len(results["head_to_head"]) == 2
    for run in results["runs"]:
        wr = run["win_rate_vs_gold"]
        assert wr["n"] + wr["failed"] == 4 and wr["ci_low"] <= wr["rate"] <= wr["ci_high"]
        assert set(run["win_rate_by_category"]) <= {"open_qa", "brainstorming"}
        assert run["mauve"]["n_p"] == 4 and run["mauve"]["warning"]  # tiny sample: flagged
        assert run["gold_ppl"]["ppl"] > 1 and 0 <= run["rouge_l"] <= 1
        assert run["alpha"] in (0.0, 1.0)
    report = (out / "report.md").read_text()
    assert results["judge"]["prompt_sha256"] in report
    assert "local: " + judge in report and "Head to head" in report and "by category" in report
    assert set(results["plots"]) == {"winrate.png", "mauve.png", "alpha_sweep.png"}
    for name in results["plots"]:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        import matplotlib.image

        assert matplotlib.image.imread(out / name).ndim == 3
    judgments = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert len(judgments) == 4 * 4 + 2 * 4
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_eval_without_judge_uses_minilm(setup):
    root, cfg, models, _ = setup
    out = root / "out_nojudge"
    assert _run(["eval", "--models", models[0], "--data-config", str(cfg), "--num-examples", "3",
                 "--max-new-tokens", "4", "--judge", "none", "--no-ppl", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    run = results["runs"][0]
    assert results["judge"] is None and run["win_rate_vs_gold"] is None and run["gold_ppl"] is None
    assert run["mauve"]["featurizer"] == "minilm" and run["mauve"]["n_q"] == 3
    assert results["plots"] == ["mauve.png"]
    assert "no judge" in (out / "report.md").read_text()


def test_cli_rejects_bad_options(setup, monkeypatch):
    root, cfg, models, _ = setup
    base = ["eval", "--models", models[0], "--data-config", str(cfg), "--out", str(root / "bad"), "--no-progress"]
    with pytest.raises(SystemExit, match="judge-url"):
        _run([*base, "--judge", "openai", "--judge-model", "gpt-x"])
    with pytest.raises(SystemExit, match="decoding"):
        _run([*base, "--decoding", "sample:t=0"])
    with pytest.raises(SystemExit, match="labels"):
        _run([*base, "--labels", "a", "b"])
    with pytest.raises(SystemExit):  # argparse: no flag takes the key itself
        _parser().parse_args([*base, "--judge-api-key", "sk-nope"])
    with pytest.raises(SystemExit) as e:  # a key passed as the variable name is refused, and not echoed
        _run([*base, "--judge", "openai", "--judge-model", "m", "--judge-url", "http://127.0.0.1:9/v1",
              "--judge-api-key-env", "sk-nope-123"])
    assert "sk-nope" not in str(e.value)


def _imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = "seqcpo.evaluation"
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against seqcpo.evaluation
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.append(mod)
            names += [f"{mod}.{a.name}" for a in node.names]
    return names


def test_evaluation_never_imports_training_code():
    files = sorted(EVAL_DIR.rglob("*.py"))
    assert {f.relative_to(EVAL_DIR).as_posix() for f in files} >= {
        "__init__.py", "generate.py", "judges/__init__.py", "judges/api.py", "judges/local.py", "winrate.py",
        "metrics.py", "report.py", "cli.py", "data_source.py"}
    for f in files:
        for name in _imported_modules(f):
            assert not name.startswith(FORBIDDEN), f"{f.name} imports {name}"
    # and at run time, importing the whole package pulls none of it in (transitively)
    code = ("import sys, seqcpo.evaluation, seqcpo.evaluation.cli; "
            f"bad = [m for m in sys.modules if m.startswith({FORBIDDEN!r})]; print(bad); assert not bad")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)


def test_alphas_labels_and_data_config(tmp_path):
    ens = tmp_path / "ens"
    ens.mkdir()
    (ens / cli.ENSEMBLE_FILE).write_text(json.dumps({"alpha": 0.25}))
    plain = tmp_path / "plain"
    plain.mkdir()
    args = argparse.Namespace(models=[str(ens), str(plain), str(tmp_path / "x" / "plain")], labels=None, alphas=None)
    assert cli._alphas(args) == [0.25, None, None]
    assert cli._labels(args) == ["ens", "plain", "plain-2"]
    args.alphas = [0.0, 0.5, 1.0]
    assert cli._alphas(args) == [0.0, 0.5, 1.0]

    top = tmp_path / "top.yaml"
    top.write_text("dataset: wiki\ntask: continuation\nprefix_tokens: 8\n")
    ns = _parser().parse_args(["eval", "--models", "m", "--data-config", str(top), "--prefix-tokens", "12",
                               "--out", str(tmp_path)])
    cfg = cli.data_config_from_args(ns)
    assert (cfg.dataset, cfg.task, cfg.prefix_tokens) == ("wiki", "continuation", 12)  # flags win over YAML
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  dataset: wiki\n  prefix_tokenz: 8\n")
    ns.data_config = str(bad)
    with pytest.raises(SystemExit, match="prefix_tokenz"):
        cli.data_config_from_args(ns)


# ----------------------------------------------------------------------------- EvalConfig, one loader, validation


@pytest.mark.parametrize("flags, needle", [
    (["--num-examples", "-1"], "--num-examples: field 'num_examples': -1 must be >= 0"),
    (["--batch-size", "0"], "--batch-size: field 'batch_size': 0 must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens: field 'max_new_tokens': 0 must be >= 1"),
    (["--judge-tie-margin", "nan"], "--judge-tie-margin: judge: field 'tie_margin': 'nan' is not valid"),
    (["--judge-timeout", "inf"], "--judge-timeout: judge: field 'timeout': 'inf' is not valid"),
    (["--judge-concurrency", "0"], "--judge-concurrency: judge: field 'concurrency': 0 must be >= 1"),
    (["--seed", "1.5"], "--seed: field 'seed': '1.5' is not valid (expected a whole number)"),
    (["--alphas", "0.5", "nan"], "--alphas: field 'alphas[1]': 'nan' is not valid"),
])
def test_eval_flags_are_validated_naming_the_flag(tmp_path, flags, needle):
    base = ["--models", "m1", "m2", "--out", str(tmp_path / "o")]
    for command in (["eval"], ["generate"]) if "judge" not in flags[0] and "alphas" not in flags[0] else (["eval"],):
        with pytest.raises(SystemExit) as e:
            _run([*command, *base, *flags])
        assert needle in str(e.value) and "\n" not in str(e.value)


def test_eval_out_that_is_a_file_names_the_flag(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    for out in (f, f / "sub"):
        with pytest.raises(SystemExit, match=r"--out .*is a file, not a folder"):
            _run(["generate", "--models", "m", "--out", str(out)])


def test_eval_config_from_yaml_with_flags_on_top(tmp_path):
    cfg_file = tmp_path / "eval.yaml"
    cfg_file.write_text("eval:\n  models: [a, b]\n  num_examples: 0\n  decoding: [greedy, 'beam:n=2']\n"
                        "  judge: {backend: local, model: j, debias: false, tie_margin: 0.5}\n  order: random\n")
    ns = _parser().parse_args(["eval", "--config", str(cfg_file), "--out", str(tmp_path / "o"),
                               "--judge-tie-margin", "1.5", "--no-progress"])
    cfg = cli.eval_config_from_args(ns)
    assert cfg.models == ["a", "b"] and cfg.num_examples == 0 and cfg.decoding == ["greedy", "beam:n=2"]
    # the flag replaced one judge field and kept the others from the file
    assert (cfg.judge.backend, cfg.judge.model, cfg.judge.debias, cfg.judge.tie_margin) == ("local", "j", False, 1.5)
    assert cfg.order == "random" and cfg.progress is False and cfg.judge.uses_log_odds is False
    cfg_file.write_text("eval:\n  judge: {backend: local, tie_margn: 1}\n")
    with pytest.raises(SystemExit, match=r"eval.yaml: judge: unknown field 'tie_margn' \(did you mean 'tie_margin'"):
        cli.eval_config_from_args(_parser().parse_args(["eval", "--config", str(cfg_file), "--models", "m",
                                                        "--out", str(tmp_path / "o")]))


def test_head_to_head_has_a_paired_interval_in_results_and_report(tmp_path):
    """Two models judged on the same 4 items: the paired difference of their win rates against the gold.

    Against the gold, A wins items 0-2 and loses 3; B wins item 0 and loses 1-3 (the judge below ranks
    "good" over the gold over "bad"). Per item A - B = 0, 1, 1, 0: mean 0.5, sample sd 0.5774,
    interval 0.5 -+ 1.96 * 0.5774 / 2 = [-0.0658, 1.0658].
    """
    from seqcpo.evaluation.config import EvalConfig
    from seqcpo.evaluation.evaluate import compare, score_model
    from seqcpo.evaluation.judges import Verdict
    from seqcpo.evaluation.report import render_markdown
    from seqcpo.decoding import DecodingConfig

    class PrefersGood:
        def judge(self, prompt, a, b):
            rank = {"good": 2, "gold": 1, "bad": 0}
            return Verdict("tie" if rank[a] == rank[b] else ("A" if rank[a] > rank[b] else "B"))

        def describe(self):
            return {"backend": "fake", "model": "prefers-good", "host": None, "prompt_sha256": "0" * 64}

    def rows(label, gens):
        return {"greedy": [{"id": str(i), "model": label, "decoding": "greedy", "prompt": "p", "reference": "gold",
                            "generation": g, "num_tokens": 1} for i, g in enumerate(gens)]}

    cfg = EvalConfig(progress=False, mauve="none")
    judge = PrefersGood()
    a, b = rows("A", ["good", "good", "good", "bad"]), rows("B", ["good", "bad", "bad", "bad"])
    configs = [DecodingConfig("greedy", num_beams=1, name="greedy")]
    runs, vs_gold = [], []
    for label, r in (("A", a), ("B", b)):
        ru, j = score_model(label, None, None, r, configs, None, judge, cfg)
        runs += ru
        vs_gold += j
    [h2h], _ = compare(judge, "A", "B", a, b, cfg, vs_gold=vs_gold)
    p = h2h["paired_vs_gold"]
    # per-item differences 0, 1, 1, 0: a resample's mean is k/4 with k ~ Binomial(4, 1/2), and P(k = 0) = 1/16
    # exceeds 2.5%, so the 95% percentile interval is [0, 1] exactly (a normal interval would pass 1)
    assert p["n"] == 4 and p["difference"] == pytest.approx(0.5)
    assert (p["low"], p["high"]) == (0.0, 1.0)
    report = render_markdown({"runs": runs, "head_to_head": [h2h], "judge": judge.describe()})
    assert "paired diff vs gold" in report and "+50.0 [+0.0, +100.0]" in report


def test_a_local_judge_that_cannot_load_fails_before_generation(setup, monkeypatch):
    from seqcpo.evaluation import generate as gen

    root, cfg, models, _ = setup

    def no_generation(*a, **k):
        raise AssertionError("generation started before the judge was checked")

    monkeypatch.setattr(gen, "generate_continuations", no_generation)
    with pytest.raises(SystemExit, match=r"--judge-model .*no-such-judge: not a loadable checkpoint"):
        _run(["eval", "--models", models[0], "--data-config", str(cfg), "--judge", "local", "--judge-model",
              str(root / "no-such-judge"), "--out", str(root / "out_badjudge"), "--no-progress"])


def test_grid_arms_table_shows_judge_columns_only_with_a_judge():
    """A grid without a judge has no empty win-rate columns and says what its claims rest on; with a judge the
    win-rate and head-to-head columns come back. MiniLM similarity is shown either way."""
    from seqcpo.evaluation.report import _arms_table

    compute = {"kind": "train", "summary": "cpo", "train_seconds": 10.0, "train_steps": 3, "ensemble_seconds": None,
               "generate_seconds": 2.0, "generations_copied_from": None, "negatives_seconds": None,
               "evaluate_seconds": 1.0}
    run = {"label": "cpo", "decoding": "greedy", "mauve": None, "rouge_l": 0.25, "similarity": 0.5432, "rep_3": 0.1,
           "win_rate_vs_gold": None}
    results = {"judge": None, "runs": [run], "grid": {"eval": {"baseline": "mle"}, "compute": {"cpo": compute}}}
    bare = "\n".join(_arms_table(results))
    assert "win vs gold" not in bare and "vs mle" not in bare and "No judge in this grid" in bare
    assert "| MiniLM cos |" in bare and "| 0.543 |" in bare
    judged = "\n".join(_arms_table({**results, "judge": {"kind": "api"}}))
    assert "win vs gold % [95% CI]" in judged and "vs mle % [95% CI]" in judged
    header, rule = judged.splitlines()[2:4]
    assert header.count("|") == rule.count("|")


def test_the_audits_small_errors_say_what_to_do(setup, tmp_path, capsys):
    """A README audit's findings: a misspelt flag of eval/generate/ensemble got no suggestion; a missing model
    folder's path was said twice and a failed command left an empty --out folder behind; scoring the training
    split (--split train) was told to drop data flags that were never given."""
    from seqcpo.cli import main

    root, cfg, models, _ = setup
    assert main(["eval", "--models", models[0], "--out", str(tmp_path / "o"), "--judge-modle", "x"]) == 2
    assert "did you mean --judge-model?" in capsys.readouterr().err
    assert main(["generate", "--models", models[0], "--out", str(tmp_path / "o"), "--nmu-examples", "3"]) == 2
    assert "did you mean --num-examples?" in capsys.readouterr().err

    out = tmp_path / "new" / "out"
    with pytest.raises(SystemExit) as e:
        _run(["eval", "--models", str(tmp_path / "no-such-run" / "final"), "--out", str(out), "--no-progress"])
    said = str(e.value)
    assert said.count("no-such-run") == 1 and "no such model folder" in said, said
    assert not (tmp_path / "new").exists()  # made by the command, removed when it failed before writing

    trained = tmp_path / "trained"
    Path(_save(trained, 3))
    (trained / "seqcpo_config.yaml").write_text(cfg.read_text().replace("data:\n", "").replace("  ", ""))
    with pytest.raises(SystemExit) as e:
        _run(["generate", "--models", str(trained), "--split", "train", "--out", str(tmp_path / "g"),
              "--no-progress"])
    assert "evaluate on --split test or validation" in str(e.value) and "drop the" not in str(e.value), e.value
