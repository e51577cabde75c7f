"""Fault injection on checkpoints and resumes: a finished run resumed, a checkpoint corrupted in place, crafted
state files, a weights-only checkpoint, a full disk, and data or model content changed under the same names.

Each test names the defect it guards against; each failed on the code before content digests and per-file
checksums (markers listed sizes only; identities hashed the first and last MiB of a file).
"""

import json
import logging
import os
import pickle
import re

import pytest

from conftest import make_tiny_llama, make_toy_tokenizer
from seqcpo.models.digest import sha256_file
from seqcpo.training.checkpoints import (
    COMPLETE_MARKER,
    identity_differences,
    read_marker,
    run_identity,
    write_complete_marker,
)
from seqcpo.training.config import ConfigError, load_config


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt_assets")
    tok = make_toy_tokenizer()
    model = make_tiny_llama(vocab_size=len(tok))
    model.save_pretrained(root / "tiny-llama")
    tok.save_pretrained(root / "tiny-llama")
    words = ["river", "market", "bridge", "city", "wool", "salt", "square", "bread"]
    data = root / "train.jsonl"
    with open(data, "w") as fh:
        for i in range(24):
            a, b = words[i % 8], words[(3 * i + 1) % 8]
            fh.write(json.dumps({"id": f"r{i}", "instruction": f"Describe the {a}.", "context": "",
                                 "response": f"The {a} is by the {b}."}) + "\n")
    return {"model": str(root / "tiny-llama"), "data": str(data), "root": root}


def _over(assets, out, **over):
    base = dict(
        model_name_or_path=assets["model"], dataset=assets["data"], task="instruction", prompt_template="plain",
        validation_size=0, test_size=0, output_dir=str(out), per_device_train_batch_size=4, max_steps=3,
        learning_rate=5e-3, lr_scheduler_type="linear", warmup_steps=0, logging_steps=1, save_strategy="steps",
        save_steps=1, report_to="none", objective="cpo", num_negatives=2, negatives="tn:2", beta=1.0, seed=0,
        dataloader_num_workers=0, use_cpu=True, disable_tqdm=True,
    )
    base.update(over)
    return base


def _cfg(assets, out, **over):
    return load_config(None, _over(assets, out, **over))


def _train(cfg):
    from seqcpo.training.run import train

    return train(cfg)


def _argv(assets, out, **over):
    argv = ["train"]
    for k, v in _over(assets, out, **over).items():
        argv += [f"--{k}", str(v)]
    return argv


def _flip_middle(path, n=64):
    """Overwrite ``n`` bytes in the middle of a file with their complement: same size, other content."""
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.seek(size // 2)
        chunk = fh.read(n)
        fh.seek(size // 2)
        fh.write(bytes(255 - b for b in chunk))
    assert os.path.getsize(path) == size


def _checkpoints(out):
    return sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))


# ---------------------------------------------------------------- a finished run stays finished


def test_resuming_a_finished_run_trains_nothing_and_keeps_final(assets, tmp_path, caplog):
    """Defect: ``--resume_from_checkpoint true`` on a run that reached max_steps trained one more step, wrote
    checkpoint-(max+1) and overwrote final/ (with a linear schedule, from a step past the schedule's end)."""
    out = tmp_path / "run"
    first = _train(_cfg(assets, out))
    assert first["steps"] == 3
    weights = sha256_file(str(out / "final" / "model.safetensors"))
    stamp = os.stat(out / "final" / "model.safetensors").st_mtime_ns
    with caplog.at_level(logging.INFO, logger="seqcpo"):
        again = _train(_cfg(assets, out, resume_from_checkpoint="true"))
    assert again["steps"] == 3 and again["trainer"] is None
    assert _checkpoints(out) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert sha256_file(str(out / "final" / "model.safetensors")) == weights
    assert os.stat(out / "final" / "model.safetensors").st_mtime_ns == stamp  # not rewritten
    said = [r.getMessage() for r in caplog.records if "nothing to train" in r.getMessage()]
    assert len(said) == 1 and "already reached step 3 (max_steps=3)" in said[0] and "final/ is kept" in said[0]

    # killed after its last checkpoint, before final/: final/ is written from that checkpoint, not trained on
    import shutil

    shutil.rmtree(out / "final")
    _train(_cfg(assets, out, resume_from_checkpoint="true"))
    assert _checkpoints(out) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert sha256_file(str(out / "final" / "model.safetensors")) == sha256_file(
        str(out / "checkpoint-3" / "model.safetensors")) == weights
    assert read_marker(str(out / "final"))["step"] == 3
    assert not (out / "final" / "optimizer.pt").exists()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out / "final"))  # plain transformers reloads it


def test_resuming_with_fewer_steps_on_a_constant_schedule_trains_nothing(assets, tmp_path):
    """Defect: a resume past max_steps (max_steps lowered on a constant schedule) trained one more step."""
    out = tmp_path / "run"
    _train(_cfg(assets, out, lr_scheduler_type="constant"))
    again = _train(_cfg(assets, out, lr_scheduler_type="constant", max_steps=2, resume_from_checkpoint="true"))
    assert again["steps"] == 3 and _checkpoints(out) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]


def test_a_resume_saves_and_logs_at_this_calls_intervals(assets, tmp_path):
    """Defect: transformers restores ``save_steps``/``logging_steps`` from the checkpoint's trainer state, so a run
    resumed with ``--save_steps 1`` after ``--save_steps 2`` still saved (and logged) every 2 steps."""
    out = tmp_path / "run"
    _train(_cfg(assets, out, lr_scheduler_type="constant", max_steps=2, save_steps=2, logging_steps=2))
    assert _checkpoints(out) == ["checkpoint-2"]
    _train(_cfg(assets, out, lr_scheduler_type="constant", max_steps=4, save_steps=1, logging_steps=1,
                resume_from_checkpoint="true"))
    assert _checkpoints(out) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["save_steps"] == 1 and state["logging_steps"] == 1
    assert [r["step"] for r in state["log_history"] if "loss" in r] == [2, 3, 4]


def test_a_resumed_run_counts_the_seconds_of_every_part(assets, tmp_path, monkeypatch):
    """Defect: a resumed run's ``seconds`` (run_info.json, the grid's compute column) counted only the last part
    (an arm trained in three parts reported a third of its time). Every checkpoint now records the run's seconds
    so far; a resume adds to them; a checkpoint that recorded none is said, with the step it covers."""
    out = tmp_path / "run"
    _train(_cfg(assets, out, lr_scheduler_type="constant", max_steps=2))
    first = read_marker(str(out / "checkpoint-2"))["seconds"]
    info = json.loads((out / "run_info.json").read_text())
    assert 0 < first <= info["seconds"] and "seconds_untimed_before_step" not in info
    marker = read_marker(str(out / "checkpoint-2"))
    marker["seconds"] = 1000.0  # as if the first part had taken 1,000 s
    (out / "checkpoint-2" / COMPLETE_MARKER).write_text(json.dumps(marker))
    again = _train(_cfg(assets, out, lr_scheduler_type="constant", max_steps=3, resume_from_checkpoint="true"))
    info = json.loads((out / "run_info.json").read_text())
    assert info["seconds"] == again["seconds"] > 1000 and "seconds_untimed_before_step" not in info
    assert 1000 < read_marker(str(out / "checkpoint-3"))["seconds"] <= read_marker(str(out / "final"))["seconds"]
    # a checkpoint from a seqcpo that recorded no seconds: counted from there, and said
    marker = read_marker(str(out / "checkpoint-3"))
    del marker["seconds"]
    (out / "checkpoint-3" / COMPLETE_MARKER).write_text(json.dumps(marker))
    later = _train(_cfg(assets, out, lr_scheduler_type="constant", max_steps=4, resume_from_checkpoint="true"))
    info = json.loads((out / "run_info.json").read_text())
    assert later["seconds_untimed_before_step"] == info["seconds_untimed_before_step"] == 3
    assert info["seconds"] < 1000
    # resumed once more: the steps before 3 are still untimed (every later marker carries the note)
    assert read_marker(str(out / "checkpoint-4"))["seconds_untimed_before_step"] == 3
    _train(_cfg(assets, out, lr_scheduler_type="constant", max_steps=5, resume_from_checkpoint="true"))
    info = json.loads((out / "run_info.json").read_text())
    assert info["seconds_untimed_before_step"] == 3
    assert read_marker(str(out / "final"))["seconds_untimed_before_step"] == 3
    # a finished run resumed (its run_info.json lost): the time its last checkpoint recorded, the note kept
    (out / "run_info.json").unlink()
    done = _train(_cfg(assets, out, lr_scheduler_type="constant", max_steps=5, resume_from_checkpoint="true"))
    assert done["seconds"] == read_marker(str(out / "checkpoint-5"))["seconds"] > 0
    assert done["seconds_untimed_before_step"] == 3


def test_dry_run_judges_a_checkpoint_for_the_processes_that_wrote_it(assets, tmp_path):
    """Review finding: the one-process dry run refused (or planned a fresh start for) a checkpoint written by a
    multi-process launch, which that launch resumes: the dry run judges it for the processes that wrote it."""
    from seqcpo.training.dry_run import make_plan, render

    out = tmp_path / "run"
    _train(_cfg(assets, out, lr_scheduler_type="constant", max_steps=2))
    cfg = _cfg(assets, out, lr_scheduler_type="constant", max_steps=4, resume_from_checkpoint="true")
    marker = read_marker(str(out / "checkpoint-2"))
    marker["identity"] = run_identity(cfg, 4)  # as if 4 processes had written it
    (out / "checkpoint-2" / COMPLETE_MARKER).write_text(json.dumps(marker))
    text = render(make_plan(cfg))
    assert "resume" in text and "checkpoint-2 (complete, written under these settings, by 4 processes)" in text
    with pytest.raises(ConfigError, match="processes"):  # this one process cannot resume it for real
        _train(cfg)


# ---------------------------------------------------------------- checksums in the completeness marker


def test_a_checkpoint_corrupted_in_place_is_skipped_as_torn(assets, tmp_path, caplog):
    """Defect: weights corrupted in place at the same size passed the completeness marker (sizes only) and
    training resumed from garbage."""
    out = tmp_path / "run"
    _train(_cfg(assets, out, lr_scheduler_type="constant", max_steps=3))
    marker = read_marker(str(out / "checkpoint-3"))
    assert all(len(e["sha256"]) == 64 for e in marker["files"].values())
    _flip_middle(out / "checkpoint-3" / "model.safetensors")
    assert read_marker(str(out / "checkpoint-3")) is not None  # same sizes: only the checksum sees it
    # an explicit path to it is refused with the file named
    with pytest.raises(ConfigError, match=r"checkpoint-3'?: the checkpoint is corrupted \(model.safetensors"):
        _train(_cfg(assets, out, lr_scheduler_type="constant", max_steps=4,
                    resume_from_checkpoint=str(out / "checkpoint-3")))
    with caplog.at_level(logging.INFO, logger="seqcpo"):
        resumed = _train(_cfg(assets, out, lr_scheduler_type="constant", max_steps=4, resume_from_checkpoint="true"))
    text = caplog.text
    assert re.search(r"checkpoint-3 is incomplete \(model\.safetensors no longer matches the sha256", text), text
    assert f"resume: from {out / 'checkpoint-2'}" in text
    assert resumed["steps"] == 4


def test_every_checkpoint_corrupted_is_a_clear_error(assets, tmp_path):
    out = tmp_path / "run"
    _train(_cfg(assets, out, max_steps=2, save_total_limit=1))
    _flip_middle(out / "checkpoint-2" / "optimizer.pt")
    with pytest.raises(ConfigError, match=r"no complete checkpoint in output_dir=.*\(1 incomplete or corrupted: "
                                          r"checkpoint-2\); drop resume_from_checkpoint"):
        _train(_cfg(assets, out, max_steps=3, resume_from_checkpoint="true"))


# ---------------------------------------------------------------- crafted state files, weights-only checkpoints


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('SEQCPO_TEST_CANARY', '/tmp/seqcpo-canary')}",))


@pytest.mark.parametrize("name", ["rng_state.pth", "optimizer.pt", "scheduler.pt"])
def test_a_crafted_state_file_is_one_line_naming_it(assets, tmp_path, monkeypatch, capsys, name):
    """Defect: a crafted rng_state.pth / optimizer.pt / scheduler.pt ended in an UnpicklingError traceback (safe,
    but no file named). The marker is rewritten too, as an attacker would, so only the safe load can tell."""
    from seqcpo.cli import main

    canary = tmp_path / "ran"
    monkeypatch.setenv("SEQCPO_TEST_CANARY", str(canary))
    out = tmp_path / "run"
    _train(_cfg(assets, out, max_steps=2, save_steps=2, lr_scheduler_type="constant"))
    ckpt = out / "checkpoint-2"
    (ckpt / name).write_bytes(pickle.dumps({"state": _Payload()}))
    old = json.loads((ckpt / COMPLETE_MARKER).read_text())
    write_complete_marker(str(ckpt), 2, old["identity"])
    rc = main(_argv(assets, out, max_steps=3, lr_scheduler_type="constant", resume_from_checkpoint="true"))
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert rc == 2 and "Traceback" not in err and "UnpicklingError" not in last
    assert last.startswith(f"seqcpo: error: resume_from_checkpoint: {ckpt / name}: refused"), last
    assert not canary.exists(), "the payload ran"


def test_a_save_only_model_checkpoint_is_marked_and_refuses_a_resume_clearly(assets, tmp_path):
    """Defect: a checkpoint written with save_only_model (no optimizer, scheduler or RNG state) resumed silently
    with a fresh optimizer; it must be marked complete (it is a usable model) and refuse a resume by name."""
    out = tmp_path / "run"
    _train(_cfg(assets, out, max_steps=2, save_only_model=True, lr_scheduler_type="constant"))
    marker = read_marker(str(out / "checkpoint-2"))
    assert marker is not None and "optimizer.pt" not in marker["files"]
    assert "model.safetensors" in marker["files"]
    with pytest.raises(ConfigError, match=r"checkpoint-2 holds no optimizer.pt or scheduler.pt \(written with "
                                          r"save_only_model: true"):
        _train(_cfg(assets, out, max_steps=3, save_only_model=True, lr_scheduler_type="constant",
                    resume_from_checkpoint="true"))


# ---------------------------------------------------------------- a full disk


def test_too_little_free_disk_stops_before_the_checkpoint_is_written(assets, tmp_path, monkeypatch, capsys):
    """Defect: a full disk was found in the middle of a checkpoint write (a 40-line SafetensorError traceback);
    the free space is now checked before each checkpoint and the run stops with one line naming the need."""
    import shutil

    from seqcpo.cli import main
    from seqcpo.training.checkpoints import saving

    real = shutil.disk_usage
    calls = []

    def small_disk(path):
        calls.append(path)
        usage = real(path)
        return usage._replace(free=4 << 20 if len(calls) >= 2 else usage.free)  # full before checkpoint-2

    monkeypatch.setattr(saving.shutil, "disk_usage", small_disk)
    out = tmp_path / "run"
    rc = main(_argv(assets, out))
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert rc == 3 and "Traceback" not in err
    assert re.fullmatch(
        rf"seqcpo: error: output_dir='{re.escape(str(out))}': not enough disk for checkpoint-2: it needs about "
        r"[0-9.]+ MB, 4.2 MB free; nothing was written\. .* the last complete checkpoint is "
        + re.escape(str(out / "checkpoint-1")), last), last
    assert _checkpoints(out) == ["checkpoint-1"] and not (out / "final").exists()


def test_no_space_left_inside_safetensors_is_one_line(assets, tmp_path, monkeypatch, capsys):
    """Defect: ``SafetensorError ... No space left on device`` during a checkpoint write was a 40-line
    traceback; it is one line naming the folder and the space a checkpoint needs, and the partial folder goes."""
    import transformers.modeling_utils as mu
    from safetensors import SafetensorError

    from seqcpo.cli import main

    real = mu.safe_save_file
    seen = []

    def full(tensors, filename, *args, **kwargs):
        seen.append(filename)
        if "checkpoint-2" in str(filename):
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(mu, "safe_save_file", full)
    out = tmp_path / "run"
    rc = main(_argv(assets, out))
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert rc == 3 and "Traceback" not in err, err[-3000:]
    assert re.fullmatch(
        rf"seqcpo: error: output_dir='{re.escape(str(out))}': writing checkpoint-2 failed \(No space left on device; "
        r"a checkpoint needs about [0-9.]+ MB\); the last complete checkpoint is "
        + re.escape(str(out / "checkpoint-1")), last), last
    assert _checkpoints(out) == ["checkpoint-1"]


# ---------------------------------------------------------------- content, not paths


def test_a_same_size_edit_in_the_middle_of_a_large_data_file_is_seen(assets, tmp_path, monkeypatch):
    """Defect: the data fingerprint hashed the first and last MiB of a file, so a same-size edit in the middle of
    a large data file was not seen on resume."""
    monkeypatch.setenv("SEQCPO_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "big.jsonl"
    with open(data, "w") as fh:
        for i in range(40000):  # ~3.5 MB
            fh.write(json.dumps({"id": f"r{i}", "instruction": f"Describe item {i:06d}.", "context": "",
                                 "response": "It is by the river."}) + "\n")
    cfg = _cfg(assets, tmp_path / "run", dataset=str(data))
    before = run_identity(cfg)
    text = data.read_bytes()
    mid = text.index(b"item 020000")
    data.write_bytes(text[:mid] + b"item 020001" + text[mid + 11:])  # same size, one record changed
    assert data.stat().st_size == len(text)
    after = run_identity(cfg)
    assert [d[0] for d in identity_differences(before, after)] == ["data (content of the dataset / negatives)"]
    # and a touch without a change is the same content
    os.utime(data, ns=(1, 1))
    assert run_identity(cfg)["data_fingerprint"] == after["data_fingerprint"]


def test_model_weights_replaced_under_the_same_folder_refuse_a_resume(assets, tmp_path):
    """Defect: a starting model folder rewritten with other weights (same path; a re-run MLE model) resumed as if
    it were the same start, when the change fell outside the first and last 64 KiB of its files."""
    model_dir = tmp_path / "start"
    import shutil

    shutil.copytree(assets["model"], model_dir)
    out = tmp_path / "run"
    _train(_cfg(assets, out, model_name_or_path=str(model_dir), lr_scheduler_type="constant", max_steps=2))
    _flip_middle(model_dir / "model.safetensors", n=8)
    with pytest.raises(ConfigError, match=r"model \(content of model_name_or_path\): 'fingerprint"):
        _train(_cfg(assets, out, model_name_or_path=str(model_dir), lr_scheduler_type="constant", max_steps=3,
                    resume_from_checkpoint="true"))
