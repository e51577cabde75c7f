"""Fixed negatives for document rows (``seqcpo negatives`` with ``task: document``): one folder row per anchor
window ``"<row id>@<a>"`` with the anchors fixed at their epoch-0 draw and the reference cached per (document,
chunk, anchor); training on the folder with reference precomputed takes the live run's first step; a changed
anchor setting and a missing window are one clear line each."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import make_tiny_llama, make_toy_tokenizer, save_tiny_llama
from test_streaming import write_corpus

pytestmark = pytest.mark.usefixtures("one_torch_thread")

C = 4


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("doc_offline")
    save_tiny_llama(root / "tiny")
    return {"root": root, "model": str(root / "tiny"), "data": write_corpus(root / "corpus.jsonl", 30, short_every=7)}


def _cfg(assets, out, **over):
    from seqcpo.training.config import load_config

    base = dict(
        model_name_or_path=assets["model"], dataset=assets["data"], task="document", max_length=24,
        continuation_tokens=C, anchors_per_row=2, validation_size=3, test_size=3, output_dir=str(out),
        per_device_train_batch_size=2, max_steps=1, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to="none",
        objective="cpo", num_negatives=2, negatives="tn:1,mn:1", beta=1.0, seed=0, use_cpu=True, disable_tqdm=True,
    )
    base.update(over)
    return load_config(None, base)


def _rows(cfg):
    from seqcpo.data import load_splits
    from seqcpo.models import load_tokenizer

    return load_splits(cfg.data_config(), load_tokenizer(cfg.model_name_or_path)).train


def _folder_rows(folder):
    import pyarrow.parquet as pq

    man = json.load(open(os.path.join(folder, "manifest.json")))
    assert man["complete"]
    out = {}
    for s in man["shards"]:
        for r in pq.read_table(os.path.join(folder, s["file"])).to_pylist():
            out[r["id"]] = r
    return man, out


@pytest.fixture(scope="module")
def folder(assets):
    """Fixed negatives of the default config, made with shards of 5 rows (several shards, rows whole)."""
    from seqcpo.training.run import make_negatives

    out = str(assets["root"] / "negatives")
    make_negatives(_cfg(assets, assets["root"] / "unused"), out, shard_size=5)
    return out


def test_the_folder_holds_exactly_the_rows_epoch0_anchor_windows_with_the_references_log_probs(assets, folder):
    from transformers import AutoModelForCausalLM

    from seqcpo.batching import candidate_batch, negatives_from_offline
    from seqcpo.document_rows import choose_anchors
    from seqcpo.reference import FrozenCopyReference
    from seqcpo.seeding import example_generators
    from seqcpo.types import Example

    cfg = _cfg(assets, assets["root"] / "unused")
    rows = _rows(cfg)
    tokens = [e.prefix_ids + e.continuation_ids for e in rows]
    ids = [e.meta["id"] for e in rows]
    # the anchors a live run draws in epoch 0: each row's generator (seed, row id, 0, "anchors")
    gens = example_generators(0, ids, 0, "anchors")
    want = {f"{rid}@{a}": (t, a) for rid, t, g in zip(ids, tokens, gens) for a in choose_anchors(len(t), C, 2, None, g)}
    man, got = _folder_rows(folder)
    assert set(got) == set(want) and man["num_rows"] == len(want) > 2 * 10
    assert any("#" in k for k in got)  # rows past a document's first chunk are named (document, chunk, anchor)
    assert man["settings"]["data"]["anchors_per_row"] == 2 and "epoch-0" in man["settings"]["anchors"]
    windows, found = [], []
    for key, (t, a) in want.items():
        assert got[key]["prefix_ids"] == t[:a] and got[key]["gold_ids"] == t[a:a + C]
        windows.append(Example(prefix_ids=t[:a], continuation_ids=t[a:a + C], meta={"id": key}))
        found.append(got[key])
    neg, stored = negatives_from_offline(found)
    # the cached reference is the model's log-probs of each window's gold + negatives with its full prefix
    model = AutoModelForCausalLM.from_pretrained(assets["model"])
    naive = FrozenCopyReference(model, copy_model=False, layout="naive", pad_token_id=0)
    torch.testing.assert_close(stored, naive.logps(candidate_batch(windows, neg)), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("streaming", [False, True], ids=["in_memory", "streamed"])
def test_training_on_the_folder_takes_the_live_runs_first_step(assets, folder, tmp_path, streaming):
    """Same rows, same epoch-0 anchors, TN + MN: the folder's negatives and cached reference give the same SGD
    step as negatives made live and a live frozen-copy reference."""
    from seqcpo.reference import PrecomputedReference
    from seqcpo.training.run import train

    if streaming:
        from seqcpo.training.run import make_negatives

        folder = str(tmp_path / "neg_stream")  # the config (streaming included) is in the folder's settings
        make_negatives(_cfg(assets, tmp_path / "unused", streaming=True), folder, shard_size=7)
    live = train(_cfg(assets, tmp_path / "live", reference="frozen_copy", streaming=streaming))
    fixed = train(_cfg(assets, tmp_path / "fixed", reference="precomputed", negatives_path=folder,
                       streaming=streaming))
    assert isinstance(fixed["trainer"].reference, PrecomputedReference)  # no reference model held
    start = torch.cat([p.flatten() for p in make_tiny_llama(vocab_size=len(make_toy_tokenizer())).parameters()])
    a = torch.cat([p.detach().flatten() for p in live["trainer"].model.parameters()])
    b = torch.cat([p.detach().flatten() for p in fixed["trainer"].model.parameters()])
    assert (a - start).norm() > 1e-3  # the step moved the weights
    assert (a - b).abs().max() < 1e-6
    lv, fx = live["trainer"].state.log_history[0], fixed["trainer"].state.log_history[0]
    assert fx["loss/cpo"] == pytest.approx(lv["loss/cpo"], rel=1e-5) and lv["loss/cpo"] > 0


@pytest.mark.parametrize("change, field", [
    (dict(anchors_per_row=3), "data.anchors_per_row: 2 in the folder, 3 now"),
    (dict(anchor_stride=3), "data.anchor_stride: None in the folder, 3 now"),
    (dict(continuation_tokens=5), "data.continuation_tokens: 4 in the folder, 5 now"),
    (dict(max_length=20), "data.max_length: 24 in the folder, 20 now"),
])
def test_a_changed_anchor_setting_refuses_the_folder_naming_the_field(assets, folder, tmp_path, change, field):
    from seqcpo.training.offline_reader import read_offline_negatives
    from seqcpo.training.run import make_negatives

    cfg = _cfg(assets, tmp_path / "x", reference="precomputed", negatives_path=folder, **change)
    with pytest.raises(ValueError, match=field) as e:
        read_offline_negatives(folder, cfg, _rows(cfg))
    assert "\n" not in str(e.value)
    resumed = field.replace("in the folder", "there").replace("(", r"\(")
    with pytest.raises(ValueError, match=f"holds negatives made with other settings \\({resumed}"):
        make_negatives(_cfg(assets, tmp_path / "y", **change), folder, shard_size=5)  # a resume is refused too


def test_a_missing_window_is_one_line_naming_the_id_and_the_folder(assets, folder, tmp_path):
    from seqcpo.batching import ExampleDataset
    from seqcpo.training.offline_reader import read_offline_negatives
    from seqcpo.training.trainer import SeqCPOTrainer
    from seqcpo.types import Example
    from transformers import AutoModelForCausalLM

    cfg = _cfg(assets, tmp_path / "t", reference="precomputed", negatives_path=folder)
    rows = _rows(cfg)
    extra = Example(prefix_ids=rows[0].prefix_ids, continuation_ids=rows[0].continuation_ids,
                    meta={"id": "unseen#1"})  # a row the folder was not made for
    with pytest.raises(ValueError, match=rf"negatives_path {folder} has no row for \d+ of \d+ anchor windows "
                                         r"of the training rows \(first: id unseen#1@\d+\)") as e:
        read_offline_negatives(folder, cfg, rows + [extra])
    assert "\n" not in str(e.value)
    # a stream is checked as it is read: the step looks each window up and names the first it lacks
    found, manifest = read_offline_negatives(folder, cfg)
    trainer = SeqCPOTrainer(AutoModelForCausalLM.from_pretrained(assets["model"]), cfg,
                            train_dataset=ExampleDataset([extra, rows[1]]), offline_meta=manifest,
                            offline_windows=found)
    with pytest.raises(ValueError, match=rf"negatives_path {folder} has no fixed negatives for window "
                                         r"unseen#1@\d+ \(row unseen#1, anchor \d+\)") as e:
        trainer.train()
    assert "\n" not in str(e.value)
