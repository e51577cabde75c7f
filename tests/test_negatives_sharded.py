"""`seqcpo negatives` at scale: Parquet shards that `datasets` reads, the same rows from 1 and 2 processes,
a kill -9 then a resume with another shard size that ends complete and correct (never complete with rows
missing), and training that looks rows up by id without loading the folder."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import make_tiny_llama, make_toy_tokenizer, free_port

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("negscale")
    tok = make_toy_tokenizer()
    model = make_tiny_llama(vocab_size=len(tok))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    words = "the river market bridge city wool salt square bread books fog".split()
    (root / "docs.txt").write_text(
        "".join(" ".join(words[(i * j + j) % len(words)] for j in range(12)) + ".\n\n" for i in range(26))
    )
    cfg = root / "cfg.yaml"
    cfg.write_text(
        f"model_name_or_path: {root / 'model'}\ndataset: {root / 'docs.txt'}\ntask: continuation\n"
        "prefix_tokens: 6\ncontinuation_tokens: 6\nvalidation_size: 2\ntest_size: 2\nobjective: cpo\n"
        "num_negatives: 2\nnegatives: tn:1,mn:1\nmax_steps: 1\nlogging_steps: 1\nsave_strategy: 'no'\n"
        "report_to: none\nlearning_rate: 1.0e-3\nseed: 0\nuse_cpu: true\ndisable_tqdm: true\n"
        "per_device_train_batch_size: 2\n"
    )
    return {"root": root, "cfg": str(cfg)}



def _config(setup, **over):
    from seqcpo.training.config import load_config

    return load_config(setup["cfg"], {"output_dir": str(setup["root"] / "run"), **over})


def _run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _rows(folder):
    """Every row of a finished folder, read with `datasets` from the manifest's Parquet shards."""
    import datasets

    man = json.load(open(os.path.join(folder, "manifest.json")))
    assert man["complete"]
    files = [os.path.join(folder, s["file"]) for s in man["shards"]]
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(os.path.join(folder, "..", "hf")))
    return man, {r["id"]: r for r in ds}


def _train_ids(setup):
    from seqcpo.data import load_splits
    from seqcpo.models import load_tokenizer

    cfg = _config(setup)
    return [str(e.meta["id"]) for e in load_splits(cfg.data_config(), load_tokenizer(cfg.model_name_or_path)).train]


def test_two_processes_make_the_rows_of_one(setup):
    from seqcpo.training.run import make_negatives

    root = setup["root"]
    make_negatives(_config(setup), str(root / "one"), shard_size=3)  # one process: this one
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    _run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port(),
          "-m", "seqcpo.cli", "negatives", "--config", setup["cfg"], "--out", str(root / "two"), "--shard-size", "3"])
    man1, one = _rows(root / "one")
    man2, two = _rows(root / "two")
    ids = _train_ids(setup)
    assert len(ids) > 6 and man1["num_shards"] >= 3  # several shards, so both ranks made some
    # no duplicate, no gap: exactly the training split's ids, in plan order
    assert sorted(one) == sorted(ids) and sorted(two) == sorted(ids) and man1["num_rows"] == len(ids)
    assert man1["world_size"] == 1 and man2["world_size"] == 2
    assert [s["file"] for s in man1["shards"]] == [s["file"] for s in man2["shards"]]
    for i in ids:
        a, b = one[i], two[i]
        assert (a["negatives"], a["valid"], a["sources"], a["gold_ids"]) == (b["negatives"], b["valid"], b["sources"], b["gold_ids"])
        assert len(a["ref_logps"]) == 3
        assert a["ref_logps"] == pytest.approx(b["ref_logps"], abs=1e-5)


def test_kill_then_resume_with_another_shard_size_is_complete_and_correct(setup):
    from seqcpo.training.offline_reader import read_offline_negatives
    from seqcpo.training.run import make_negatives

    root = setup["root"]
    out = root / "killed"
    # a child that writes one shard per 0.3 s, so the kill lands between shards of a half-made folder
    slow = (
        "import sys, time\n"
        "import seqcpo.training.offline as o\n"
        "w = o._write_shard\n"
        "o._write_shard = lambda p, r: (w(p, r), time.sleep(0.3))\n"
        "from seqcpo.cli import main\n"
        f"sys.exit(main(['negatives', '--config', {setup['cfg']!r}, '--out', {str(out)!r}, '--shard-size', '1']))\n"
    )
    child = subprocess.Popen([sys.executable, "-c", slow], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and child.poll() is None:
        if out.exists() and sum(f.endswith(".parquet") for f in os.listdir(out)) >= 3:
            break
        time.sleep(0.05)
    assert child.poll() is None, "the child finished before it could be killed: " + child.stderr.read().decode()[-2000:]
    child.send_signal(signal.SIGKILL)
    child.wait()
    man = json.load(open(out / "manifest.json"))
    assert not man["complete"]
    n_ids = len(_train_ids(setup))
    assert 3 <= sum(f.endswith(".parquet") for f in os.listdir(out)) < n_ids
    cfg = _config(setup)
    with pytest.raises(ValueError, match="incomplete; run the same `seqcpo negatives` command again"):
        read_offline_negatives(str(out), cfg)

    # resume with another shard size: re-planned, complete, every row, equal to a fresh run at that size
    info = make_negatives(cfg, str(out), shard_size=4)
    assert info["shards"] == -(-n_ids // 4)
    man, rows = _rows(out)
    assert man["shard_size"] == 4 and man["num_rows"] == n_ids == len(rows)
    assert sorted(f for f in os.listdir(out) if f.endswith(".parquet")) == sorted(s["file"] for s in man["shards"])
    make_negatives(cfg, str(root / "fresh4"), shard_size=4)
    _, fresh = _rows(root / "fresh4")
    assert rows == fresh

    # and back to the first size on a complete folder: re-planned again, never complete with rows missing
    make_negatives(cfg, str(out), shard_size=16)
    man, rows = _rows(out)
    assert man["shard_size"] == 16 and len(rows) == n_ids

    # a shard lost from a finished folder: training names the fix, and that fix (the same command) works
    lost = man["shards"][0]["file"]
    os.remove(out / lost)
    with pytest.raises(ValueError, match=f"{lost} is missing; run the same `seqcpo negatives` command again"):
        read_offline_negatives(str(out), cfg)
    make_negatives(cfg, str(out), shard_size=16)
    man, rows = _rows(out)
    assert (out / lost).exists() and len(rows) == n_ids

    # a folder made with other generators is refused, not overwritten
    with pytest.raises(ValueError, match="other settings"):
        make_negatives(_config(setup, negatives="tn:2"), str(out), shard_size=16)


def test_training_reads_rows_by_id_and_names_a_fix_that_works(setup):
    from seqcpo.data import load_splits
    from seqcpo.models import load_tokenizer
    from seqcpo.training.offline_reader import OfflineNegatives, read_offline_negatives
    from seqcpo.training.run import make_negatives, train
    from seqcpo.types import Example

    root = setup["root"]
    cfg = _config(setup)
    make_negatives(cfg, str(root / "lookup"), shard_size=5)
    train_split = load_splits(cfg.data_config(), load_tokenizer(cfg.model_name_or_path)).train
    rows, manifest = read_offline_negatives(str(root / "lookup"), cfg, train_split)
    assert isinstance(rows, OfflineNegatives) and len(rows) == len(train_split)
    ex = train_split[-1]
    row = rows[str(ex.meta["id"])]
    assert row["id"] == str(ex.meta["id"]) and row["gold_ids"] == list(ex.continuation_ids)
    assert "no-such-id" not in rows
    with pytest.raises(KeyError):
        rows["no-such-id"]

    # an example the folder does not hold: the error says to make a folder for this run's data
    extra = Example(prefix_ids=[5, 6], continuation_ids=[7, 2], meta={"id": "extra"})
    with pytest.raises(ValueError, match="no row for 1 of .*--out NEW_DIR"):
        read_offline_negatives(str(root / "lookup"), cfg, [*train_split, extra])
    # the same ids with other tokens: refused (the stored reference log-probs would be another sequence's)
    changed = Example(prefix_ids=list(ex.prefix_ids), continuation_ids=[7, 7, 2], meta=dict(ex.meta))
    with pytest.raises(ValueError, match="other token ids"):
        read_offline_negatives(str(root / "lookup"), cfg, [*train_split[:-1], changed])

    out = train(_config(setup, negatives_path=str(root / "lookup"), output_dir=str(root / "trained")))
    assert out["trainer"].reference.name == "precomputed" and out["steps"] == 1


def _flip_middle(path, n=16):
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.seek(size // 2)
        chunk = fh.read(n)
        fh.seek(size // 2)
        fh.write(bytes(255 - b for b in chunk))


@pytest.mark.parametrize("damage", ["same_size", "truncated"])
def test_a_damaged_shard_is_named_and_the_same_command_repairs_it(setup, damage):
    """Defect: a truncated or corrupted shard in a complete folder ended in a traceback from the Parquet reader
    (no shard named, no advice), and a shard corrupted at the same size was trusted by `seqcpo negatives`."""
    from seqcpo.training.offline_reader import read_offline_negatives
    from seqcpo.training.run import make_negatives

    root = setup["root"]
    out = root / f"damaged-{damage}"
    cfg = _config(setup)
    make_negatives(cfg, str(out), shard_size=8)
    man, before = _rows(out)
    shard = man["shards"][1]["file"]
    if damage == "same_size":
        _flip_middle(out / shard)
    else:
        with open(out / shard, "r+b") as fh:
            fh.truncate(os.path.getsize(out / shard) // 2)
    with pytest.raises(ValueError) as err:
        read_offline_negatives(str(out), cfg)
    msg = str(err.value)
    assert "\n" not in msg and f"shard {shard}" in msg, msg
    assert "run the same `seqcpo negatives` command again: it checks every shard and remakes the damaged ones" in msg
    make_negatives(cfg, str(out), shard_size=8)  # the same command
    man2, after = _rows(out)
    assert after == before and man2["shards"][1]["sha256"] == man["shards"][1]["sha256"]
    read_offline_negatives(str(out), cfg)


def test_negatives_of_a_model_folder_whose_weights_were_replaced_are_refused(setup, tmp_path):
    """Defect: negatives made with a model folder were accepted after that folder's weights were replaced (the
    old reference log-probs used; `seqcpo negatives` called the folder complete)."""
    import shutil

    from seqcpo.training.offline_reader import read_offline_negatives
    from seqcpo.training.run import make_negatives

    model_dir = tmp_path / "model"
    shutil.copytree(setup["root"] / "model", model_dir)
    cfg = _config(setup, model_name_or_path=str(model_dir))
    out = tmp_path / "neg"
    make_negatives(cfg, str(out), shard_size=8)
    read_offline_negatives(str(out), cfg)
    other = make_tiny_llama(vocab_size=len(make_toy_tokenizer()), seed=7)
    other.save_pretrained(model_dir)  # same folder, same file names and sizes, other weights
    cfg = _config(setup, model_name_or_path=str(model_dir))
    with pytest.raises(ValueError) as err:
        read_offline_negatives(str(out), cfg)
    msg = str(err.value)
    assert "\n" not in msg and re.search(r"model_digest: '[0-9a-f]{32}' in the folder, '[0-9a-f]{32}' now", msg), msg
    assert "the model folder's weights were replaced since" in msg
    with pytest.raises(ValueError, match=r"holds negatives made with other settings \(model_digest: '[0-9a-f]+' "
                                         r"there, '[0-9a-f]+' now\)"):
        make_negatives(cfg, str(out), shard_size=8)


def test_a_folder_without_a_model_digest_is_warned_about_once(setup, tmp_path, caplog):
    """Defect: a folder made before model digests were recorded was warned about twice in one run (its settings
    are checked before the model loads and again when its rows are read)."""
    import json
    import logging

    from seqcpo.training.offline_reader import check_offline_settings, read_offline_negatives
    from seqcpo.training.run import make_negatives

    cfg = _config(setup)
    out = tmp_path / "neg"
    make_negatives(cfg, str(out), shard_size=8)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["settings"].pop("model_digest", None)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="seqcpo"):
        check_offline_settings(str(out), cfg)
        read_offline_negatives(str(out), cfg)
    said = [r for r in caplog.records if "recorded no digest of the model's weights" in r.getMessage()]
    assert len(said) == 1, said


def test_a_mismatch_names_each_field_with_both_values_in_one_line(setup):
    """Defect: training on a folder made with other data settings failed with a 1,490-character dump of two
    config dictionaries instead of naming the field that differs."""
    from seqcpo.training.offline_reader import read_offline_negatives
    from seqcpo.training.run import make_negatives

    out = setup["root"] / "mismatch"
    make_negatives(_config(setup), str(out), shard_size=8)
    with pytest.raises(ValueError) as err:
        read_offline_negatives(str(out), _config(setup, validation_size=3, seed=5))
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 500, msg
    assert "data.validation_size: 2.0 in the folder, 3.0 now; seed: 0 in the folder, 5 now" in msg, msg


def test_negatives_cli_prints_a_next_command_with_its_overrides_and_counts_examples(setup, capsys):
    """Defect: `seqcpo negatives` printed a next command that dropped the overrides it was run with (so that
    command failed on the folder it had made), and its progress bar counted shards (0/1 for minutes)."""
    import shlex

    from seqcpo.cli import main

    out = setup["root"] / "cli-next"
    assert main(["negatives", "--config", setup["cfg"], "--out", str(out), "--shard-size", "100",
                 "--seed", "3", "--num_negatives", "2"]) == 0
    captured = capsys.readouterr()
    line = [x for x in captured.out.splitlines() if x.startswith("Train on them with: ")][-1]
    cmd = shlex.split(line.removeprefix("Train on them with: "))
    assert cmd == ["seqcpo", "train", "--config", setup["cfg"], "--seed", "3", "--num_negatives", "2",
                   "--negatives_path", str(out)]
    n = len(_train_ids(setup))
    assert f"{n}/{n}" in captured.err and "ex" in captured.err  # examples, not shards (one shard here)
    # the printed command trains on the folder (its settings match)
    assert main(cmd[1:] + ["--output_dir", str(setup["root"] / "cli-next-run")]) == 0


def test_next_train_command_replaces_a_negatives_path_override():
    from seqcpo.training.run import next_train_command

    assert next_train_command(None, ["--negatives_path", "old", "--beta", "0.5", "--negatives-path=x"], "new dir") == (
        "seqcpo train --beta 0.5 --negatives_path 'new dir'")


def test_an_decodes_several_batches_together_and_draws_the_same_rows(setup, monkeypatch):
    """AN-only (and per-example) negatives are decoded ``an_batch_size`` prefixes at a time instead of one training
    batch at a time (the CPU cost of AN is mostly per decoding step), and every row is what one batch at a time
    draws: prompts of different lengths (left-padded differently in each grouping) included."""
    import seqcpo.training.offline as offline
    from seqcpo.training.run import make_negatives

    root = setup["root"]
    words = "the river market bridge city wool salt square bread books fog".split()
    data = root / "instr.jsonl"
    with open(data, "w") as fh:
        for i in range(22):  # instructions of 2 to 9 words: the prompts differ in length
            fh.write(json.dumps({"id": f"q{i}", "instruction": " ".join(words[j % 11] for j in range(i, i + 2 + i % 8)),
                                 "context": "", "response": " ".join(words[(i + j) % 11] for j in range(5))}) + "\n")
    calls = []
    build = offline.build_negative_generator

    def spy(*a, **kw):
        gen = build(*a, **kw)

        def call(examples, *args, **kwargs):
            calls.append(len(examples))
            return gen(examples, *args, **kwargs)
        call.uses_gold_logits = getattr(gen, "uses_gold_logits", False)
        return call

    monkeypatch.setattr(offline, "build_negative_generator", spy)
    over = dict(dataset=str(data), task="instruction", prompt_template="plain", validation_size=2, test_size=2,
                negatives="an:1,tn:1", an_max_new_tokens=5, per_device_train_batch_size=2)
    make_negatives(_config(setup, an_batch_size=2, **over), str(root / "an_alone"), shard_size=8)
    alone, calls[:] = list(calls), []
    make_negatives(_config(setup, an_batch_size=6, **over), str(root / "an_grouped"), shard_size=8)
    grouped = list(calls)
    assert set(alone) == {2} and max(grouped) == 6  # one batch per call, then three (a shard's end: fewer)
    assert sum(alone) == sum(grouped) == 18
    _, a = _rows(root / "an_alone")
    _, b = _rows(root / "an_grouped")
    assert sorted(a) == sorted(b) and len(a) == 18
    for i in a:
        assert (a[i]["negatives"], a[i]["valid"], a[i]["sources"]) == (b[i]["negatives"], b[i]["valid"], b[i]["sources"])
        assert a[i]["ref_logps"] == pytest.approx(b[i]["ref_logps"], abs=1e-5)
    # an_batch_size only changes speed: a folder resumed or trained on with another value keeps its shards
    from seqcpo.training.offline_reader import read_offline_negatives

    man, _ = _rows(root / "an_alone")
    os.remove(root / "an_alone" / man["shards"][1]["file"])
    calls[:] = []
    make_negatives(_config(setup, an_batch_size=6, **over), str(root / "an_alone"), shard_size=8)
    man2, again = _rows(root / "an_alone")
    assert sum(calls) == man["shards"][1]["rows"]  # only the missing shard was made again
    assert [m["file"] for m in man2["shards"]] == [m["file"] for m in man["shards"]] and again.keys() == a.keys()
    assert all(again[i]["negatives"] == a[i]["negatives"] for i in a)
    assert man2["settings"]["options"]["an_batch_size"] == 2  # the folder's record
    read_offline_negatives(str(root / "an_alone"), _config(setup, an_batch_size=5, **over))
    # MN reads its batch's gold logits, BN draws from its batch: those stay one batch per call
    calls[:] = []
    make_negatives(_config(setup, an_batch_size=6, **{**over, "negatives": "an:1,mn:1"}), str(root / "an_mn"), shard_size=8)
    assert set(calls) == {2}


def test_dry_run_refuses_what_the_run_refuses_and_counts_the_folders_negatives(setup, capsys):
    """Defect: --dry-run printed a plan (rc 0) for runs the real run refuses: a negatives folder made under other
    settings, streaming without max_steps, an output folder that cannot be written; and counted a negatives
    folder's first batch as gold only. Each refusal is now the run's own line; the folder's rows are counted."""
    from seqcpo.cli import main

    out = setup["root"] / "dry-negatives"
    make = ["negatives", "--config", setup["cfg"], "--out", str(out), "--shard-size", "100"]
    assert main(make) == 0
    capsys.readouterr()
    base = ["train", "--config", setup["cfg"], "--dry-run", "--negatives_path", str(out)]
    fresh = setup["root"] / "dry" / "nested" / "run"
    assert main(base + ["--output_dir", str(fresh)]) == 0
    text = capsys.readouterr().out
    assert f"fixed negatives read from {out} (K = 2)" in text, text
    packed = int(re.search(r"(\d+) tokens in prefix-shared rows", text).group(1))
    assert packed > 2 * (6 + 6), text  # two examples' prefix + gold, and their negatives
    assert not (setup["root"] / "dry").exists()  # nothing made (a parent missing here: a config for elsewhere)
    assert "not probed" in text
    assert main(base + ["--output_dir", str(setup["root"] / "dry-probed")]) == 0
    assert "not probed" not in capsys.readouterr().out
    assert not (setup["root"] / "dry-probed").exists()  # probed writable, and removed again

    cases = [
        (["--seed", "1", "--output_dir", str(fresh)], "was made with other settings than this run's (seed: 0"),
        (["--streaming", "true", "--max_steps", "-1", "--output_dir", str(fresh)], "needs max_steps"),
        (["--output_dir", "/proc/seqcpo-dry-run"], "--output_dir='/proc/seqcpo-dry-run': cannot write"),
    ]
    for extra, said in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, (extra, err)
        run = main(["train", "--config", setup["cfg"], "--negatives_path", str(out)] + extra)
        assert run == 2 and said in capsys.readouterr().err, extra  # the real run's own refusal


def test_a_streamed_run_refuses_rows_made_from_a_data_file_since_changed_in_place(setup, tmp_path):
    """Defect (campaign 3): with streaming, rows were matched to examples by id alone (the split's digest is only
    taken in memory), so a data file edited in place under the same ids trained on the old negatives and the old
    gold's reference log-probs. Each streamed example is now checked against its row's token ids."""
    import shutil

    from seqcpo.training.run import make_negatives, train

    data = tmp_path / "docs.txt"
    shutil.copy(setup["root"] / "docs.txt", data)
    over = dict(dataset=str(data), validation_size=0, test_size=0, streaming=True, max_steps=1)
    out = tmp_path / "neg"
    make_negatives(_config(setup, **over), str(out), shard_size=8)
    train(_config(setup, output_dir=str(tmp_path / "ok"), negatives_path=str(out), **over))  # unchanged: trains
    data.write_text(data.read_text().replace("river", "harbour"))  # same paragraphs, same ids, other tokens
    with pytest.raises(ValueError, match=r"its row for training example .* was made from other token ids"):
        train(_config(setup, output_dir=str(tmp_path / "changed"), negatives_path=str(out), **over))
