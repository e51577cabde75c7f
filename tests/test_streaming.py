"""Streaming data (``streaming: true``): the same examples and split membership as in memory, disjoint
per-process shards that cover the corpus, resume without replay, context limits counted, the Wikidump recipe."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from conftest import make_tiny_gpt2, make_tiny_llama, make_toy_tokenizer, free_port
from seqcpo.data import DataConfig, DataError, load_splits
from seqcpo.data.streaming import StreamingExamples, load_streaming

WORDS = "the river market bridge city wool salt square bread books fog north".split()


def write_corpus(path, n, short_every=0, with_ids=True):
    """n documents of varied length (every ``short_every``-th one too short for a window), each with the fields of
    both tasks."""
    with open(path, "w") as f:
        for i in range(n):
            length = 3 if short_every and i % short_every == 0 else 20 + (i * 7) % 40
            rec = {
                "text": " ".join(WORDS[(i * j + j) % len(WORDS)] for j in range(length)) + ".",
                "instruction": f"Describe the {WORDS[i % 12]} near the {WORDS[(3 * i + 1) % 12]}.",
                "response": " ".join(WORDS[(i + j) % 12] for j in range(2 + i % 9)),
            }
            if with_ids:
                rec = {"id": f"doc{i}", **rec}
            f.write(json.dumps(rec) + "\n")
            if i % 17 == 5:
                f.write("\n")  # blank lines are skipped by both readers (positions count records)
    return str(path)


@pytest.fixture(scope="module")
def tok():
    return make_toy_tokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl", 240, short_every=9)


def cfg(dataset, **kw):
    base = dict(dataset=dataset, task="continuation", prefix_tokens=6, continuation_tokens=6, validation_size=8,
                test_size=8)
    base.update(kw)
    return DataConfig(**base)


def one_pass(ds: StreamingExamples):
    """Every item of the stream's first pass (it never ends: stop when the pass number moves on)."""
    out = []
    for item in ds:
        if item["epoch"] > ds._start["epoch"]:
            break
        out.append(item)
    return out


def as_items(examples):
    return [(str(e.meta["id"]), list(e.prefix_ids), list(e.continuation_ids)) for e in examples]


def as_items_stream(items):
    return [(i["id"], list(i["prefix_ids"]), list(i["continuation_ids"])) for i in items]


# -- the same examples and splits as in memory


@pytest.mark.parametrize(
    "kw",
    [
        dict(),  # counts: the smallest keys among usable records (short documents are not usable)
        dict(validation_size=0.1, test_size=0.05),  # fractions: each record by its own key
        dict(task="instruction", prompt_template="plain", validation_size=5, test_size=3),
        dict(windows_per_document=2, split_seed=3),
    ],
)
def test_streaming_gives_the_in_memory_splits_and_examples(corpus, tok, kw):
    c = cfg(corpus, **kw)
    memory = load_splits(c, tok)
    stream = load_streaming(DataConfig(**{**c.__dict__, "streaming": True}), tok, need_validation=True,
                            need_test=True)
    assert as_items(stream.validation) == as_items(memory.validation)
    assert as_items(stream.test) == as_items(memory.test)
    assert [e.meta["prompt"] for e in stream.validation] == [e.meta["prompt"] for e in memory.validation]
    train = one_pass(stream.train(tok))
    assert as_items_stream(train) == as_items(memory.train)  # same examples, same (source) order
    assert {i["epoch"] for i in train} == {0}


def test_positional_ids_and_parquet_match(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = write_corpus(tmp_path / "noids.jsonl", 60, with_ids=False)
    rows = [json.loads(line) for line in open(path) if line.strip()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "noids.parquet")
    for data in (path, str(tmp_path / "noids.parquet")):
        c = cfg(data, validation_size=4, test_size=4)
        memory = load_splits(c, tok)
        stream = load_streaming(DataConfig(**{**c.__dict__, "streaming": True}), tok, need_test=True)
        assert as_items(stream.validation) == as_items(memory.validation)
        assert as_items(stream.test) == as_items(memory.test)
        assert as_items_stream(one_pass(stream.train(tok))) == as_items(memory.train)


def test_txt_paragraphs_stream_like_memory(tmp_path, tok):
    docs = tmp_path / "docs.txt"
    docs.write_text("".join(" ".join(WORDS[(i * j) % 12] for j in range(25)) + "\n\n" for i in range(30)))
    c = cfg(str(docs), validation_size=3, test_size=3)
    memory = load_splits(c, tok)
    stream = load_streaming(DataConfig(**{**c.__dict__, "streaming": True}), tok)
    assert as_items(stream.validation) == as_items(memory.validation)
    assert as_items_stream(one_pass(stream.train(tok))) == as_items(memory.train)


def test_txt_paragraphs_are_cut_at_the_same_line_ends_streamed_or_not(tmp_path):
    """Both readers cut lines where str.splitlines does (\\r, \\r\\n, \\n, and a form feed or a line separator inside
    a line: the streamed reader cut at \\n alone), and number lines as an editor does."""
    from seqcpo.data.row_batches import stream_row_batches
    from seqcpo.data.sources import read_records

    docs = tmp_path / "mixed.txt"
    docs.write_bytes("\ufeffone\rtwo\r\rthree\x0cfour\u2028five\r\n\r\nsix\n \nseven".encode())
    c = DataConfig(dataset=str(docs))
    memory = read_records(c)[0]
    streamed = [r for b in stream_row_batches(c) for r in b.records]
    texts = [r.fields["text"] for r in memory]
    assert texts == ["one\ntwo", "three\nfour\nfive", "six", "seven"]
    assert [(r.id, r.fields, r.where) for r in streamed] == [(r.id, r.fields, r.where) for r in memory]
    assert memory[1].where.endswith("line 4 (paragraph 1)")


# -- shards


@pytest.mark.parametrize("world", [2, 3])
def test_processes_read_disjoint_shards_that_cover_the_training_split(corpus, tok, world):
    c = cfg(corpus, streaming=True)
    stream = load_streaming(c, tok)
    everything = as_items_stream(one_pass(stream.train(tok)))
    shards = [as_items_stream(one_pass(stream.train(tok, rank, world))) for rank in range(world)]
    ids = [{i for i, _, _ in s} for s in shards]
    for a in range(world):
        for b in range(a + 1, world):
            assert not ids[a] & ids[b]
    assert sorted(x for s in shards for x in s) == sorted(everything)
    # each process tokenized its own records only
    assert all(len(s) < len(everything) for s in shards)


def test_a_step_of_w_processes_covers_the_records_of_one_process_with_a_w_times_larger_batch(tmp_path, tok):
    """Every record usable, one example each: the step's examples do not depend on the world size, although the
    validation and test records sit between them in the source."""
    path = write_corpus(tmp_path / "instr.jsonl", 120)
    stream = load_streaming(cfg(path, task="instruction", prompt_template="plain", streaming=True), tok)
    single = one_pass(stream.train(tok))
    for world in (2, 4):
        per_process = [one_pass(stream.train(tok, r, world)) for r in range(world)]
        step = 8 // world  # one optimizer step: 8 examples in all
        for s in range(len(single) // 8):
            together = sorted(i["id"] for p in per_process for i in p[s * step:(s + 1) * step])
            assert together == sorted(i["id"] for i in single[s * 8:(s + 1) * 8]), (world, s)


# -- resume


def test_resume_continues_without_replay(corpus, tok, monkeypatch):
    c = cfg(corpus, streaming=True, windows_per_document=2)
    stream = load_streaming(c, tok)
    ds = stream.train(tok, 1, 2)
    first_pass = len(one_pass(stream.train(tok, 1, 2)))
    it = iter(ds)
    full = [next(it) for _ in range(first_pass + 40)]  # past the end of the first pass: the stream goes on
    assert full[-1]["epoch"] == 1 and full[first_pass - 1]["epoch"] == 0
    import seqcpo.data.streaming as streaming

    real = streaming.stream_row_batches
    for consumed, epoch in ((37, 0), (first_pass - 1, 0), (first_pass, 0), (first_pass + 5, 1)):
        pos = ds.position(consumed)
        assert pos["epoch"] == epoch and pos["examples"] == consumed
        resumed = stream.train(tok, 1, 2)
        resumed.resume(json.loads(json.dumps(pos)))  # as stored in trainer_state.json
        starts = []

        def spy(cfg_, start=0, **kw):
            starts.append(start)
            return real(cfg_, start=start, **kw)

        monkeypatch.setattr(streaming, "stream_row_batches", spy)
        it2 = iter(resumed)
        rest = [next(it2) for _ in range(len(full) - consumed)]
        monkeypatch.setattr(streaming, "stream_row_batches", real)
        assert rest == full[consumed:]
        # the reader started at the stored record: nothing before it was converted or tokenized again
        assert starts[0] == pos["record"] and (consumed == first_pass or starts[0] > 0)


def test_resume_with_another_world_size_is_refused(corpus, tok):
    stream = load_streaming(cfg(corpus, streaming=True), tok)
    ds = stream.train(tok, 0, 2)
    next(iter(ds))
    pos = ds.position(1)
    with pytest.raises(DataError, match="same number of processes"):
        stream.train(tok, 0, 3).resume(pos)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream_assets")
    t = make_toy_tokenizer()
    model = make_tiny_llama(vocab_size=len(t))
    model.save_pretrained(root / "tiny-llama")
    t.save_pretrained(root / "tiny-llama")
    return {"model": str(root / "tiny-llama"), "data": write_corpus(root / "docs.jsonl", 200, short_every=11),
            "root": root}


def _train_cfg(assets, out, **over):
    from seqcpo.training.config import load_config

    base = dict(
        model_name_or_path=assets["model"], dataset=assets["data"], task="instruction", prompt_template="plain",
        streaming=True, validation_size=4, test_size=4, output_dir=str(out), per_device_train_batch_size=4,
        max_steps=4, learning_rate=5e-3, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
        save_strategy="no", report_to="none", objective="cpo", num_negatives=2, negatives="tn:1,bn:1", beta=1.0,
        seed=0, use_cpu=True, disable_tqdm=True,
    )
    base.update(over)
    return load_config(None, base)


def _losses(history):
    return [h["loss"] for h in history if "loss" in h and "eval_loss" not in h]


def test_streaming_run_trains_and_a_resumed_run_matches_the_uninterrupted_one(assets, tmp_path):
    import shutil

    import torch

    from seqcpo.training.run import train

    full = train(_train_cfg(assets, tmp_path / "a", max_steps=6, save_strategy="steps", save_steps=3))
    assert full["steps"] == 6 and full["examples"]["train"] is None
    before = make_tiny_llama(vocab_size=len(make_toy_tokenizer())).state_dict()
    after = full["trainer"].model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before), "every parameter should move"
    state = json.load(open(tmp_path / "a" / "checkpoint-3" / "trainer_state.json"))
    (pos,) = state["stateful_callbacks"]["StreamPositionCallback"]["attributes"]["positions"]
    assert pos["examples"] == 12 and pos["world_size"] == 1

    out_b = tmp_path / "b"
    train(_train_cfg(assets, out_b, max_steps=6, save_strategy="steps", save_steps=3))
    shutil.rmtree(out_b / "checkpoint-6")  # as if the run had died after step 3
    resumed = train(_train_cfg(assets, out_b, max_steps=6, save_strategy="steps", save_steps=3,
                               resume_from_checkpoint=str(out_b / "checkpoint-3")))
    ds = resumed["trainer"].train_dataset
    assert ds._start["examples"] == 12 and ds._start["record"] > 0  # started at the stored position
    assert _losses(resumed["trainer"].state.log_history)[-3:] == pytest.approx(
        _losses(full["trainer"].state.log_history)[-3:], rel=1e-5, abs=1e-6)


def test_resume_with_restored_callback_states(assets, tmp_path):
    """transformers rebuilds stateful callbacks from the checkpoint when asked: the stream still resumes."""
    from seqcpo.training.run import train

    train(_train_cfg(assets, tmp_path / "r", max_steps=2, save_strategy="steps", save_steps=1))
    out = train(_train_cfg(assets, tmp_path / "r", max_steps=2, save_strategy="steps", save_steps=1,
                           resume_from_checkpoint=str(tmp_path / "r" / "checkpoint-1"),
                           restore_callback_states_from_checkpoint=True))
    assert out["steps"] == 2 and out["trainer"].train_dataset._start["examples"] == 4


def test_stream_position_counts_accumulation_micro_batches(assets, tmp_path):
    from seqcpo.training.run import train

    out = train(_train_cfg(assets, tmp_path / "ga", max_steps=2, gradient_accumulation_steps=2, save_strategy="steps",
                           save_steps=2))
    state = json.load(open(tmp_path / "ga" / "checkpoint-2" / "trainer_state.json"))
    (pos,) = state["stateful_callbacks"]["StreamPositionCallback"]["attributes"]["positions"]
    assert pos["examples"] == 2 * 2 * 4 == out["trainer"].train_dataset._history[-1][0]


def test_streaming_needs_max_steps(assets, tmp_path, capsys):
    from seqcpo.cli import main

    rc = main(["train", "--model_name_or_path", assets["model"], "--dataset", assets["data"], "--task",
               "continuation", "--streaming", "true", "--output_dir", str(tmp_path / "x"), "--report_to", "none",
               "--use_cpu", "true"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "max_steps" in err and "Traceback" not in err


@pytest.mark.integration
def test_streaming_cli_flags_run_two_steps(assets, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "seqcpo.cli", "train", "--dataset", assets["data"], "--task", "continuation",
         "--streaming", "true", "--model_name_or_path", assets["model"], "--prefix_tokens", "8",
         "--continuation_tokens", "8", "--max_steps", "2", "--per_device_train_batch_size", "4", "--output_dir",
         str(tmp_path / "cli"), "--report_to", "none", "--use_cpu", "true", "--save_steps", "100"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.load(open(tmp_path / "cli" / "run_info.json"))["steps"] == 2


@pytest.mark.integration
def test_two_process_streaming_run_stores_both_positions_and_resumes(assets, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo DDP): each reads its own shard, the checkpoint holds both
    positions, and a resumed 2-process run starts each stream there."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port(),
              "-m", "seqcpo.cli", "train", "--dataset", assets["data"], "--task", "continuation", "--streaming",
              "true", "--model_name_or_path", assets["model"], "--prefix_tokens", "8", "--continuation_tokens", "8",
              "--per_device_train_batch_size", "2", "--negatives", "tn", "--num_negatives", "2", "--save_steps", "2", "--report_to", "none", "--use_cpu",
              "true", "--output_dir", str(tmp_path / "ddp"),
              # the resume below extends the run to 3 steps: only a constant schedule allows that (checkpoints.py)
              "--lr_scheduler_type", "constant"]
    for extra in (["--max_steps", "2"], ["--max_steps", "3", "--resume_from_checkpoint", str(tmp_path / "ddp" /
                                                                                           "checkpoint-2")]):
        proc = subprocess.run(launch + extra, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    state = json.load(open(tmp_path / "ddp" / "checkpoint-2" / "trainer_state.json"))
    positions = state["stateful_callbacks"]["StreamPositionCallback"]["attributes"]["positions"]
    assert [(p["process_index"], p["world_size"], p["examples"]) for p in positions] == [(0, 2, 4), (1, 2, 4)]
    assert positions[0]["train_index"] % 2 == 0 and positions[1]["train_index"] % 2 == 1  # each in its own shard
    assert "process 1 resumes at pass 0, record %d" % positions[1]["record"] in proc.stderr
    assert json.load(open(tmp_path / "ddp" / "run_info.json"))["world_size"] == 2


# -- context limits


def test_overlong_examples_are_cut_to_the_model_context_and_counted(tmp_path, tok, caplog):
    long_path = tmp_path / "long.jsonl"
    with open(long_path, "w") as f:
        for i in range(40):
            n = 80 if i % 4 == 0 else 3  # every 4th prompt and response far over a 128-token context
            f.write(json.dumps({"id": i, "instruction": " ".join(WORDS[(i + j) % 12] for j in range(n)),
                                "response": " ".join(WORDS[(2 * i + j) % 12] for j in range(n))}) + "\n")
    c = DataConfig(dataset=str(long_path), task="instruction", prompt_template="plain", validation_size=2,
                   test_size=2)
    with caplog.at_level(logging.INFO, logger="seqcpo.data"):
        splits = load_splits(c, tok, context_tokens=128)
    assert splits.stats["max_prefix_tokens"] + splits.stats["max_continuation_tokens"] == 128
    for ex in splits.train + splits.validation + splits.test:
        assert len(ex.prefix_ids) + len(ex.continuation_ids) <= 128
        assert ex.continuation_ids[-1] == tok.eos_token_id
    assert splits.stats["prefix_truncated"] == 10 and splits.stats["continuation_truncated"] == 10
    assert "10 prompts cut to their last 64 tokens" in caplog.text
    assert "10 responses cut to their first 63 tokens + EOS" in caplog.text
    # the other rule: skip them, counted
    skipped = load_splits(DataConfig(**{**c.__dict__, "overlong": "skip"}), tok, context_tokens=128)
    assert skipped.stats["skipped_long"] == 10 and len(skipped.train) == 26
    # streamed: the same cut examples, and the counts reach the log
    stream = load_streaming(DataConfig(**{**c.__dict__, "streaming": True}), tok, context_tokens=128)
    ds = stream.train(tok)
    with caplog.at_level(logging.INFO, logger="seqcpo.data"):
        assert as_items_stream(one_pass(ds)) == as_items(splits.train)
    # the training split's share, said when the pass ends (counts are totals over passes)
    assert "(pass 0 done): process 0 read 36 records -> 36 training examples (8 prompts cut to their last 64 " \
        "tokens; 8 responses cut to their first 63 tokens + EOS)" in caplog.text
    assert "prompts cut to their last 64 tokens" in caplog.text


def test_overlong_instruction_data_trains_on_a_short_context_model(tmp_path):
    """A GPT-2 of 48 positions with the default caps (256 + 128) used to fail in the position embedding."""
    from seqcpo.training.run import train

    t = make_toy_tokenizer()
    model = make_tiny_gpt2(vocab_size=len(t))
    model.config.n_positions = 48
    import torch

    model.transformer.wpe.weight = torch.nn.Parameter(model.transformer.wpe.weight[:48].clone())
    model.save_pretrained(tmp_path / "gpt2-48")
    t.save_pretrained(tmp_path / "gpt2-48")
    data = write_corpus(tmp_path / "d.jsonl", 40)
    with open(data, "a") as f:
        f.write(json.dumps({"id": "long", "instruction": " ".join(WORDS * 10), "response": " ".join(WORDS * 10)}) + "\n")
    for streaming in (False, True):
        out = train(_train_cfg({"model": str(tmp_path / "gpt2-48"), "data": data}, tmp_path / f"run{streaming}",
                               streaming=streaming, max_steps=2, validation_size=2, test_size=2))
        assert out["steps"] == 2


def test_a_window_longer_than_the_context_is_a_clear_error(corpus, tok):
    with pytest.raises(DataError, match="do not fit the context of 10 tokens"):
        load_splits(cfg(corpus), tok, context_tokens=10)


# -- the Wikidump recipe (Hub; mocked here)


@pytest.mark.parametrize("name, model", [("wikidump_openllama3b.yaml", "openlm-research/open_llama_3b_v2"),
                                         ("wikidump_gpt2xl.yaml", "gpt2-xl")])
def test_wikidump_recipe_streams_wikipedia_from_the_hub(name, model, tok, monkeypatch):
    import datasets

    from seqcpo.training.config import load_config

    path = os.path.join(os.path.dirname(__file__), "..", "configs", name)
    c = load_config(path, {"output_dir": "/tmp/seqcpo-config-check", "report_to": "none", "bf16": False,
                           "use_cpu": True})
    assert c.model_name_or_path == model and c.streaming and c.max_steps > 0
    assert (c.dataset, c.dataset_config, c.task) == ("wikimedia/wikipedia", "20231101.en", "document")
    assert (c.max_length, c.anchors_per_row, c.continuation_tokens) == (1024, 8, 128)
    calls = []
    rows = [{"id": str(10 * i + 1), "url": f"https://en.wikipedia.org/wiki?curid={i}", "title": f"T{i}",
             "text": " ".join(WORDS[(i + j) % 12] for j in range(300))} for i in range(3000)]

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_list(rows).to_iterable_dataset(num_shards=4)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data_cfg = DataConfig(**{**c.data_config().__dict__, "validation_size": 0.05, "test_size": 0.05,
                             "max_eval_examples": 5})
    stream = load_streaming(data_cfg, tok, context_tokens=2048)
    assert calls[0] == (("wikimedia/wikipedia", "20231101.en"), {"split": "train", "streaming": True})
    assert len(stream.validation) == 5  # capped, and the planning pass stopped early
    assert stream.stats["records_read"] < len(rows)
    item = next(iter(stream.train(tok)))  # a row: one chunk of an article, at most max_length tokens
    assert len(item["prefix_ids"]) == 1 and 128 < len(item["continuation_ids"]) <= 1023


# -- bad input: one clear line


def test_streaming_bad_input_gives_clear_errors(tmp_path, tok):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": 1, "text": "a b c"}\n{"id": 2, "text": broken}\n')
    with pytest.raises(DataError, match=r"broken.jsonl line 2: not valid JSON"):  # as without streaming
        load_streaming(cfg(str(broken), streaming=True, validation_size=1, test_size=1), tok)
    with pytest.raises(DataError, match="no such file"):
        load_streaming(cfg(str(tmp_path / "missing.jsonl"), streaming=True), tok)
    with pytest.raises(ValueError, match="max_examples needs the whole corpus"):
        cfg("x.jsonl", streaming=True, max_examples=10)
    with pytest.raises(ValueError, match="validation_size=2000 is above max_eval_examples=1000"):
        cfg("x.jsonl", streaming=True, validation_size=2000)


def test_resume_skips_whole_data_files_already_read(tmp_path, tok, monkeypatch):
    """Several Parquet files (a Hub dataset's shards): a resume position carries the datasets reader state, so the
    files before it are not read again (here: the second of six is corrupted after a position in the sixth was
    taken; datasets may reopen a file just before the position's batch, and reads the first one's schema)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import seqcpo.data.row_batches as sources

    monkeypatch.setattr(sources, "STREAM_BATCH_ROWS", 50)
    rows = [{"id": f"doc{i}", "text": " ".join(WORDS[(i * j + j) % 12] for j in range(20 + i % 30))}
            for i in range(600)]
    files = []
    for s in range(6):
        files.append(tmp_path / f"part{s}.parquet")
        pq.write_table(pa.Table.from_pylist(rows[100 * s: 100 * (s + 1)]), files[-1])
    c = cfg(str(tmp_path), streaming=True, validation_size=0.05, test_size=0.05)
    stream = load_streaming(c, tok, need_validation=False)
    ds = stream.train(tok)
    first = one_pass(stream.train(tok))
    it = iter(ds)
    full = [next(it) for _ in range(len(first))]
    consumed = next(k for k, item in enumerate(full) if int(item["id"][3:]) >= 550)
    pos = json.loads(json.dumps(ds.position(consumed)))
    assert pos["reader"]["state"] is not None and pos["reader"]["start"] >= 500
    files[1].write_bytes(b"not parquet any more")
    resumed = stream.train(tok)
    resumed.resume(pos)
    it2 = iter(resumed)
    assert [next(it2) for _ in range(len(full) - consumed)] == full[consumed:]


# -- a finished streaming run, refused streaming resumes


def test_a_finished_streaming_run_resumed_trains_nothing(assets, tmp_path, caplog):
    """Defect: resuming a streaming run that reached max_steps (linear schedule) trained one more step, wrote
    checkpoint-(max+1) and overwrote final/."""
    import logging

    from seqcpo.models.digest import sha256_file
    from seqcpo.training.run import train

    out = tmp_path / "done"
    over = dict(max_steps=2, save_strategy="steps", save_steps=1, lr_scheduler_type="linear")
    train(_train_cfg(assets, out, **over))
    weights = sha256_file(str(out / "final" / "model.safetensors"))
    with caplog.at_level(logging.INFO, logger="seqcpo"):
        again = train(_train_cfg(assets, out, resume_from_checkpoint="true", **over))
    assert again["steps"] == 2 and again["trainer"] is None
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-1", "checkpoint-2"]
    assert sha256_file(str(out / "final" / "model.safetensors")) == weights
    assert sum("nothing to train" in r.getMessage() for r in caplog.records) == 1


def test_a_refused_streaming_resume_counts_examples_right_and_is_one_line(assets, tmp_path, capsys):
    """Defects: a refused streaming resume said "consumed 40" for a checkpoint that had read 20 examples (it
    mixed the checkpoint's batch size with this run's accumulation); a resume with another number of processes
    printed its message and then a traceback (it was found inside training)."""
    from types import SimpleNamespace

    from seqcpo.cli import main
    from seqcpo.data.stream_resume import check_stream_resume
    from seqcpo.training.run import train

    out = tmp_path / "s"
    train(_train_cfg(assets, out, max_steps=2, save_strategy="steps", save_steps=2))
    ckpt = str(out / "checkpoint-2")  # 2 steps x 4 examples
    with pytest.raises(DataError, match="same number of processes") as err:
        check_stream_resume(ckpt, SimpleNamespace(world_size=2, process_index=0, gradient_accumulation_steps=1,
                                                  train_batch_size=4))
    assert "read by 1 process(es), this run has 2" in str(err.value)
    argv = ["train", "--model_name_or_path", assets["model"], "--dataset", assets["data"], "--task", "instruction",
            "--prompt_template", "plain", "--streaming", "true", "--validation_size", "4", "--test_size", "4",
            "--output_dir", str(out), "--max_steps", "3", "--lr_scheduler_type", "constant", "--report_to", "none",
            "--use_cpu", "true", "--objective", "cpo", "--num_negatives", "2", "--negatives", "tn:1,bn:1",
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--allow_config_change",
            "true", "--resume_from_checkpoint", "true"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert ("the checkpoint's stream stopped after 8 examples per process at step 2, but this run's settings read "
            "16 per process by step 2 (2 steps x gradient_accumulation_steps 2 x per_device_train_batch_size 4)") in last


@pytest.mark.integration
def test_a_two_process_resume_of_a_one_process_stream_is_one_line_per_process(assets, tmp_path):
    """Defect: `accelerate launch` with 2 processes resuming a 1-process streaming checkpoint printed the clear
    message and then a traceback (the refusal came from inside training, with the process group live)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    common = ["train", "--dataset", assets["data"], "--task", "continuation", "--streaming", "true",
              "--model_name_or_path", assets["model"], "--prefix_tokens", "8", "--continuation_tokens", "8",
              "--per_device_train_batch_size", "2", "--negatives", "tn", "--num_negatives", "2", "--save_steps", "2",
              "--report_to", "none", "--use_cpu", "true", "--output_dir", str(tmp_path / "one"),
              "--lr_scheduler_type", "constant"]
    first = subprocess.run([sys.executable, "-m", "seqcpo.cli", *common, "--max_steps", "2",
                            "--gradient_accumulation_steps", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port(),
              "-m", "seqcpo.cli", *common, "--max_steps", "3", "--resume_from_checkpoint", "true"]
    proc = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("seqcpo: error:")]
    assert errors and all("read by 1 process(es), this run has 2" in e for e in errors), proc.stderr[-3000:]
    child_traceback = proc.stderr.split("seqcpo: error:")[-1]
    # what follows our line may only be the launcher's own report that a child exited with status 2
    assert "seqcpo/" not in child_traceback and "DataError" not in child_traceback, proc.stderr[-3000:]


def test_lazy_lines_are_cut_as_splitlines_cuts_them_at_every_chunk_boundary():
    """The streamed JSON-lines reader reads 1 MiB chunks: a \\r\\n split across two chunks is one line ending."""
    import io

    from seqcpo.data.sources import _split_lines

    data = b'{"a": 1}\r\n\r\n{"b": 2}\r{"c": 3}\n\n \n{"d": "x\\r"}\r\n{"e": 5}'
    for size in range(1, len(data) + 2):
        assert list(_split_lines(io.BytesIO(data), size)) == data.splitlines(), size
        assert list(_split_lines(io.BytesIO(data + b"\r\n"), size)) == (data + b"\r\n").splitlines(), size


def test_a_folder_of_json_lines_with_mixed_field_types_streams_the_records_it_holds(tmp_path):
    """datasets gives a field whose type varies across rows Arrow's JSON type (values as JSON text: '"x"');
    streamed records are decoded back, at any depth, and equal the records read without streaming."""
    from seqcpo.data.row_batches import stream_row_batches
    from seqcpo.data.sources import read_records

    rows = [
        {"id": 1, "prompt": "Say hi.", "rejected": "no", "meta": {"tags": "a"}},
        {"id": "b", "prompt": "Say bye.", "rejected": ["nah", "later"], "meta": {"tags": ["b", "c"]}},
        {"id": "c", "prompt": [{"role": "user", "content": "Hello?"}], "rejected": None},
    ]
    folder = tmp_path / "prefs"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = DataConfig(dataset=str(folder))
    memory = read_records(c)[0]
    batches = list(stream_row_batches(c))
    streamed = [r for b in batches for r in b.select(list(range(b.num_rows)), "id")]
    assert [b.ids("id") for b in batches] == [["1", "b", "c"]]
    assert [r.id for r in streamed] == [r.id for r in memory] == ["1", "b", "c"]
    assert streamed[0].fields["rejected"] == "no" and streamed[1].fields["rejected"] == ["nah", "later"]
    assert streamed[1].fields["meta"] == {"tags": ["b", "c"]}
    assert streamed[2].fields["prompt"] == [{"role": "user", "content": "Hello?"}]
    for s, m in zip(streamed, memory):  # streaming adds absent fields as null, which every reader reads as absent
        assert {k: v for k, v in s.fields.items() if v is not None} == {
            k: v for k, v in m.fields.items() if v is not None}
