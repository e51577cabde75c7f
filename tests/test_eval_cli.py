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
    files = sorted(EVAL_DIR.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "generate.py", "judges.py", "winrate.py", "metrics.py",
                                       "report.py", "cli.py"}
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
