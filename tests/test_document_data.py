"""Document rows as data (``task: document``): every document used to its end in chunks of at most max_length
tokens, streamed exactly as in memory, resumed mid-document without replay; a streamed training run on rows
trains CPO at anchors and a killed run resumes to the uninterrupted one's losses; bad settings are one clear line."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import make_toy_tokenizer, save_tiny_llama
from seqcpo.data import DataConfig, DataError, load_splits
from seqcpo.data.examples import build_examples
from seqcpo.data.sources import read_records
from seqcpo.data.streaming import load_streaming
from test_streaming import as_items, as_items_stream, one_pass, write_corpus

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    return make_toy_tokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("docs") / "docs.jsonl", 120, short_every=9)


def doc_cfg(dataset, **kw):
    base = dict(dataset=dataset, task="document", max_length=16, continuation_tokens=4, validation_size=6,
                test_size=6)
    base.update(kw)
    return DataConfig(**base)


def _check_to_the_end(records, groups, tok, max_length):
    texts = {r.id: r.fields["text"].strip() for r in records}
    seen = 0
    for group in groups:
        doc = group[0].meta["id"]
        assert [e.meta["id"] for e in group] == [doc] + [f"{doc}#{c}" for c in range(1, len(group))]
        rows = [e.prefix_ids + e.continuation_ids for e in group]
        assert all(len(r) == max_length for r in rows[:-1]) and 2 <= len(rows[-1]) <= max_length
        want = tok(texts[doc], add_special_tokens=False)["input_ids"]
        assert all(r[0] == before[-1] for before, r in zip(rows, rows[1:]))  # a later row starts on its context
        assert rows[0] + [t for r in rows[1:] for t in r[1:]] == want  # every token predicted once, in order
        seen += 1
    return seen


def test_every_document_is_used_to_its_end(corpus, tok):
    records, source = read_records(doc_cfg(corpus))
    groups, stats = build_examples(records, doc_cfg(corpus), tok, source)
    assert _check_to_the_end(records, groups, tok, 16) == len(records) - stats["skipped_short"]
    assert stats["documents_chunked"] > 0 and stats["skipped_short"] == 0  # 3-word documents are rows too
    assert any(len(g[-1].prefix_ids + g[-1].continuation_ids) == 2 for g in groups if len(g) > 1)  # 1 new token
    assert any(len(g) >= 3 for g in groups)


def test_the_demo_corpus_is_used_to_its_end(tok):
    """The embedded Wikipedia sections (the demo's data) in rows of 64 tokens: each article whole."""
    cfg = doc_cfg("wiki", max_length=64, continuation_tokens=16)
    records, source = read_records(cfg)
    records = records[:400]
    groups, stats = build_examples(records, cfg, tok, source)
    assert _check_to_the_end(records, groups, tok, 64) == len(groups) >= 390
    assert stats["documents_chunked"] > 100


@pytest.mark.parametrize("kw", [dict(), dict(validation_size=0.1, test_size=0.05, split_seed=2)])
def test_streamed_rows_are_the_in_memory_rows(corpus, tok, kw):
    c = doc_cfg(corpus, **kw)
    memory = load_splits(c, tok)
    stream = load_streaming(DataConfig(**{**c.__dict__, "streaming": True}), tok, need_test=True)
    assert as_items(stream.validation) == as_items(memory.validation)
    assert as_items(stream.test) == as_items(memory.test)
    assert as_items_stream(one_pass(stream.train(tok))) == as_items(memory.train)
    assert len(memory.train) > 2 * (120 - 12)  # several rows per document


def test_a_stream_of_rows_resumes_mid_document_without_replay(corpus, tok):
    stream = load_streaming(doc_cfg(corpus, streaming=True), tok)
    ds = stream.train(tok, 0, 2)
    it = iter(ds)
    full = [next(it) for _ in range(120)]
    middle = next(n for n in range(30, 100) if "#" in full[n]["id"])  # the next row is a later chunk of a document
    pos = ds.position(middle)
    assert pos["window"] >= 1
    resumed = stream.train(tok, 0, 2)
    resumed.resume(json.loads(json.dumps(pos)))
    it2 = iter(resumed)
    assert [next(it2) for _ in range(len(full) - middle)] == full[middle:]


# ---- training


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("doc_assets")
    save_tiny_llama(root / "tiny")
    return {"model": str(root / "tiny"), "data": write_corpus(root / "corpus.jsonl", 80, short_every=11)}


def _train_cfg(assets, out, **over):
    from seqcpo.training.config import load_config

    base = dict(
        model_name_or_path=assets["model"], dataset=assets["data"], task="document", max_length=24,
        continuation_tokens=4, anchors_per_row=3, streaming=True, validation_size=4, test_size=4,
        output_dir=str(out), per_device_train_batch_size=2, max_steps=4, learning_rate=5e-3,
        lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no", report_to="none",
        objective="cpo", num_negatives=3, negatives="tn:1,bn:1,mn:1", beta=1.0, seed=0, use_cpu=True,
        disable_tqdm=True,
    )
    base.update(over)
    return load_config(None, base)


def _losses(history, key="loss"):
    return [h[key] for h in history if key in h and "eval_loss" not in h]


def test_a_killed_run_on_rows_resumes_to_the_uninterrupted_losses(assets, tmp_path):
    from seqcpo.training.run import train

    full = train(_train_cfg(assets, tmp_path / "a", max_steps=6, save_strategy="steps", save_steps=3))
    history = full["trainer"].state.log_history
    assert len(_losses(history, "loss/cpo")) == 6 and all(v > 0 for v in _losses(history, "loss/cpo"))
    out_b = tmp_path / "b"
    train(_train_cfg(assets, out_b, max_steps=6, save_strategy="steps", save_steps=3))
    shutil.rmtree(out_b / "checkpoint-6")  # as if the run had died after step 3
    resumed = train(_train_cfg(assets, out_b, max_steps=6, save_strategy="steps", save_steps=3,
                               resume_from_checkpoint=str(out_b / "checkpoint-3")))
    assert resumed["trainer"].train_dataset._start["examples"] == 6
    for key in ("loss", "loss/mle", "loss/cpo"):
        assert _losses(resumed["trainer"].state.log_history, key)[-3:] == pytest.approx(
            _losses(history, key)[-3:], rel=1e-5, abs=1e-6), key


def test_the_cli_trains_on_a_streamed_corpus_of_documents(assets, tmp_path, capsys):
    """The acceptance command: seqcpo train --task document --dataset corpus.jsonl --streaming true ..."""
    from seqcpo.cli import main

    rc = main(["train", "--task", "document", "--dataset", assets["data"], "--streaming", "true",
               "--model_name_or_path", assets["model"], "--max_length", "32", "--continuation_tokens", "6",
               "--anchors_per_row", "2", "--negatives", "tn:2,bn:2", "--max_steps", "2", "--validation_size", "4",
               "--test_size", "4",
               "--per_device_train_batch_size", "2", "--logging_steps", "1", "--output_dir", str(tmp_path / "cli"),
               "--report_to", "none", "--use_cpu", "true", "--save_strategy", "no", "--disable_tqdm", "true"])
    assert rc == 0
    info = json.load(open(tmp_path / "cli" / "run_info.json"))
    assert info["steps"] == 2
    logs = json.load(open(tmp_path / "cli" / "log_history.json"))
    assert any("loss/cpo" in row and "rewards/accuracies" in row for row in logs)


def test_bad_document_settings_are_one_clear_line(assets, tmp_path, capsys):
    from seqcpo.cli import main
    from seqcpo.config_loader import ConfigError

    with pytest.raises(ValueError, match="max_length=4 must be at least continuation_tokens"):
        DataConfig(task="document", max_length=4, continuation_tokens=4)
    with pytest.raises(ConfigError, match="anchors_per_row.*4 anchors per device batch"):
        _train_cfg(assets, tmp_path / "x", anchors_per_row=1, negatives="bn", num_negatives=3,
                   per_device_train_batch_size=2)
    assert _train_cfg(assets, tmp_path / "y", reference="none").normalized_logps  # reference-free rows: SimPO's s_i
    # fixed negatives are made before training (where BN's pool is checked), so a run on a folder needs none
    assert _train_cfg(assets, tmp_path / "y", anchors_per_row=1, negatives="bn", num_negatives=3,
                      negatives_path=str(tmp_path)).negatives_path == str(tmp_path)
    with pytest.raises(DataError, match="max_length=64 does not fit the context of 32"):
        load_splits(doc_cfg(assets["data"], max_length=64), make_toy_tokenizer(), context_tokens=32)
    rc = main(["train", "--task", "document", "--dataset", assets["data"], "--model_name_or_path", assets["model"],
               "--max_length", "3", "--continuation_tokens", "4", "--output_dir", str(tmp_path / "z"),
               "--use_cpu", "true", "--report_to", "none"])
    err = capsys.readouterr().err
    assert rc == 2 and "max_length=3" in err and "Traceback" not in err


def test_window_evaluation_refuses_document_rows(tmp_path):
    """`seqcpo eval` evaluates on windows (fixed negatives for rows: tests/test_document_offline.py)."""
    from seqcpo.config_loader import ConfigError
    from seqcpo.evaluation.data_source import resolve_data

    path = tmp_path / "train.yaml"
    path.write_text("task: document\nmax_length: 128\ncontinuation_tokens: 16\n")
    with pytest.raises(ConfigError, match="train.yaml.*task=document.*--task continuation"):
        resolve_data([], str(path), [])


def test_dry_run_plans_document_rows_and_their_anchors(assets, tmp_path, capsys):
    """--dry-run on a hand-built corpus (documents of 36, 3 and 70 tokens, max_length 32): 6 rows (32 5 | 3 |
    32 32 8), the first batch's rows 32, 5, 3 with 3, 1, 0 anchors (anchors_per_row 3, C 4) or 3, 0, 0 (one every
    8 tokens), the tokens of its one pass (rows + anchors x K x longest negative) and activations in proportion."""
    from transformers import AutoConfig

    from seqcpo.cli import main
    from seqcpo.training.config import load_config
    from seqcpo.training.dry_run import make_plan

    data = tmp_path / "hand.jsonl"
    data.write_text("".join(json.dumps({"id": f"d{i}", "text": " ".join(["a"] * n)}) + "\n"
                            for i, n in enumerate((36, 3, 70))))
    base = dict(task="document", dataset=str(data), model_name_or_path=assets["model"], max_length=32,
                continuation_tokens=4, anchors_per_row=3, objective="cpo", negatives="tn:1,mn:1", num_negatives=2,
                validation_size=0, test_size=0, per_device_train_batch_size=3, max_steps=4,
                output_dir=str(tmp_path / "never"), report_to="none", use_cpu=True)
    argv = [x for k, v in base.items() for x in (f"--{k}", str(v))]
    assert main(["train", "--dry-run", *argv]) == 0
    text = capsys.readouterr().out
    assert "6 train / 0 validation / 0 test rows" in text
    assert "4 optimizer steps x 3 rows (batch 3 x accumulation 1 x 1 process(es)) = 12 rows, 2.00 epochs" in text
    assert "3 rows of 32, 5, 3 tokens (max_length 32)" in text
    assert "3, 1, 0 per row (anchors_per_row 3, continuation_tokens 4) = 4 anchors" in text
    assert "40 row tokens + 4 x 2 x 4 = 32 branch tokens = 72 tokens in one pass" in text
    assert not (tmp_path / "never").exists()

    plans = {name: make_plan(load_config(None, {**base, **over})) for name, over in (
        ("per_row", {}), ("stride", {"anchor_stride": 8}), ("an", {"negatives": "an:1,tn:1", "an_max_new_tokens": 10}))}
    lines = {name: dict(plan.lines) for name, plan in plans.items()}
    assert lines["stride"]["anchors"].startswith("3, 0, 0 per row (one every 8 tokens, continuation_tokens 4) = 3 ")
    # anchors at 8, 16, 24 as windows: sum (a + C + K C) = 20 + 28 + 36
    assert lines["stride"]["forward"] == ("40 row tokens + 3 x 2 x 4 = 24 branch tokens = 64 tokens in one pass "
                                          "(the same anchors as full-prefix windows: 84)")
    assert lines["an"]["forward"].startswith("40 row tokens + 4 x 2 x 10 = 80 branch tokens = 120 tokens")
    config = AutoConfig.from_pretrained(assets["model"])
    per_token = config.num_hidden_layers * (8 * config.hidden_size + 3 * config.intermediate_size) * 4  # float32
    act = {name: plan.memory["activations"] for name, plan in plans.items()}
    assert act["per_row"] - act["stride"] == (72 - 64) * per_token
    assert act["an"] - act["per_row"] == (120 - 72) * per_token
