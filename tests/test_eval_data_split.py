"""Evaluation scores the split the checkpoint was trained with, and never its training data silently.

Fault injection: before this change ``seqcpo eval``/``generate`` built their splits from their own defaults
(``validation_size`` 64) whatever the checkpoint was trained with, accepted flags that moved training items into
the "test" set without a word, refused ``--data-config configs/demo.yaml``, and the report did not say which split
it used.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_toy_tokenizer, save_tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny checkpoint whose seqcpo_config.yaml says it was trained with validation_size 32, test_size 16 on
    160 records (what ``seqcpo train`` saves beside the weights, written by the real ``save_config``)."""
    from seqcpo.training.config import load_config, save_config

    root = tmp_path_factory.mktemp("split")
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "instruction": f"Say {i}.", "response": "It is."}) + "\n"
                            for i in range(160)))
    ckpt = root / "run" / "final"
    save_tiny_llama(ckpt)
    cfg = load_config(None, {"dataset": str(data), "task": "instruction", "prompt_template": "plain",
                             "validation_size": 32, "test_size": 16, "output_dir": str(root / "run"),
                             "report_to": "none", "use_cpu": True})
    save_config(cfg, ckpt / "seqcpo_config.yaml")
    return root, ckpt, data, cfg.data_config()


def _split_ids(data_cfg, split: str) -> list[str]:
    from seqcpo.data import load_splits

    return [str(ex.meta["id"]) for ex in getattr(load_splits(data_cfg, make_toy_tokenizer()), split)]


def _eval(ckpt, out, *flags):
    from seqcpo.cli import main

    return main(["eval", "--models", str(ckpt), "--num-examples", "0", "--max-new-tokens", "1", "--judge", "none",
                 "--mauve-features", "none", "--no-ppl", "--no-progress", "--out", str(out), *flags])


def test_eval_uses_the_checkpoints_own_split(trained):
    """Defect: eval built its test set with validation_size 64 while the checkpoint was trained with 32: half the
    "test" items were another set than the checkpoint's held-out one."""
    import dataclasses

    root, ckpt, _, data_cfg = trained
    assert _eval(ckpt, root / "own") == 0
    rows = [json.loads(line) for line in (root / "own" / "generations.jsonl").read_text().splitlines()]
    expected = _split_ids(data_cfg, "test")
    assert sorted(r["id"] for r in rows) == sorted(expected) and len(expected) == 16
    defaults = dataclasses.replace(data_cfg, validation_size=64, test_size=64)
    assert set(expected) != set(_split_ids(defaults, "test"))  # the old behaviour scored another set
    results = json.loads((root / "own" / "results.json").read_text())
    data = results["data"]
    assert (data["validation_size"], data["test_size"], data["split"]) == (32, 16, "test")
    assert data["settings_from"] == str(ckpt / "seqcpo_config.yaml")
    assert data["split_sizes"] == "train 112 / validation 32 / test 16"
    assert "none (the checkpoint's own split)" in data["train_overlap"]
    report = (root / "own" / "report.md").read_text()
    assert "validation_size=32" in report and "split_sizes=train 112 / validation 32 / test 16" in report


def test_a_training_item_in_the_test_set_is_refused_or_flagged(trained, capsys):
    """Defect: a data flag that moves the test set (another split seed) scored the checkpoint's training items
    as "test" items without a word. Now it is refused in one line, or scored and flagged with
    --allow-train-overlap."""
    root, ckpt, _, data_cfg = trained
    assert _eval(ckpt, root / "moved", "--split-seed", "1") == 2
    err = capsys.readouterr().err
    assert "are in the training split of final" in err and "--allow-train-overlap" in err
    assert len([line for line in err.splitlines() if line.startswith("seqcpo: error")]) == 1
    assert not (root / "moved" / "generations.jsonl").exists()  # refused before any generation

    assert _eval(ckpt, root / "flagged", "--split-seed", "1", "--allow-train-overlap") == 0
    train = set(_split_ids(data_cfg, "train"))
    rows = [json.loads(line) for line in (root / "flagged" / "generations.jsonl").read_text().splitlines()]
    n = sum(r["id"] in train for r in rows)
    assert n > 0
    results = json.loads((root / "flagged" / "results.json").read_text())
    assert f"{n} TRAINING ITEMS SCORED" in results["data"]["train_overlap"]
    assert "TRAINING ITEMS SCORED" in (root / "flagged" / "report.md").read_text()


def test_a_training_config_is_accepted_as_data_config(trained, tmp_path):
    """Defect: ``--data-config configs/demo.yaml`` was refused (its model and trainer fields are not data
    fields); now its data fields are read and the rest left out, and flags still win."""
    from seqcpo.cli import build_parser
    from seqcpo.evaluation import cli

    ns = build_parser().parse_args(["eval", "--models", "smollm2-135m", "--data-config",
                                    str(ROOT / "configs" / "demo.yaml"), "--test-size", "8", "--out", str(tmp_path)])
    cfg = cli.data_config_from_args(ns)
    assert (cfg.dataset, cfg.validation_size, cfg.test_size, cfg.max_examples) == ("wiki", 32, 8, 256)
    # the file wins over the checkpoint's settings, the checkpoint over the defaults
    root, ckpt, data, _ = trained
    ns = build_parser().parse_args(["eval", "--models", str(ckpt), "--data-config", str(ROOT / "configs" / "demo.yaml"),
                                    "--out", str(tmp_path)])
    cfg = cli.data_config_from_args(ns)
    assert (cfg.dataset, cfg.task, cfg.validation_size, cfg.test_size) == ("wiki", "continuation", 32, 64)
    ns = build_parser().parse_args(["eval", "--models", str(ckpt), "--out", str(tmp_path)])
    cfg = cli.data_config_from_args(ns)
    assert (cfg.dataset, cfg.task, cfg.validation_size, cfg.test_size) == (str(data), "instruction", 32, 16)
