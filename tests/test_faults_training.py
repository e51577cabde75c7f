"""Fault injection on the training side: a run resumed under other settings, checkpoints torn by a
kill, a loss or gradient that stops being finite, and an output folder that cannot be written.

Each test failed on the code as it was before ``seqcpo.training.checkpoints`` (commit c01417a): resume loaded
another run's checkpoint, a torn checkpoint broke ``resume_from_checkpoint: true``, rotation deleted the newest
good checkpoint in favour of a torn one, a NaN loss was logged as 0.0 and ``final/`` got NaN weights with exit 0,
and a file at ``output_dir`` ended in a bare errno message.
"""

import json
import logging
import math
import os
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from conftest import make_tiny_llama, make_toy_tokenizer
from seqcpo.training.checkpoints import (
    COMPLETE_MARKER,
    NonFiniteError,
    finite_logs,
    identity_differences,
    read_marker,
    run_identity,
)
from seqcpo.training.config import ConfigError, load_config


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
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
    return {"model": str(root / "tiny-llama"), "data": str(data)}


def _over(assets, out, **over):
    base = dict(
        model_name_or_path=assets["model"], dataset=assets["data"], task="instruction", prompt_template="plain",
        validation_size=0, test_size=0, output_dir=str(out), per_device_train_batch_size=4, max_steps=4,
        learning_rate=5e-3, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="steps",
        save_steps=1, report_to="none", objective="cpo", num_negatives=2, negatives="tn:1,bn:1", beta=1.0, seed=0,
        dataloader_num_workers=0, use_cpu=True, disable_tqdm=True,
    )
    base.update(over)
    return base


def _cfg(assets, out, **over):
    return load_config(None, _over(assets, out, **over))


class _Killed(Exception):
    """Stands in for kill -9 (the process dies; nothing after this point runs)."""


class _KillAfterSave(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            raise _Killed(state.global_step)


def _losses(history):
    return [h["loss"] for h in history if "loss" in h]


def _train(cfg, callbacks=None):
    from seqcpo.training.run import train

    return train(cfg, callbacks=callbacks)


# ---------------------------------------------------------------- run identity


def test_resume_refuses_a_checkpoint_written_by_another_run(assets, tmp_path):
    """Issue 12 defect 1: run A, then run B (other learning rate) into the same folder, killed after its first
    rotation; ``resume_from_checkpoint: true`` took A's newest checkpoint and finished with A's weights."""
    out = tmp_path / "run"
    _train(_cfg(assets, out, learning_rate=5e-3, max_steps=4, save_steps=2))
    with pytest.raises(_Killed):
        _train(_cfg(assets, out, learning_rate=1e-3, save_total_limit=1), callbacks=[_KillAfterSave(2)])
    with pytest.raises(ConfigError) as err:
        _train(_cfg(assets, out, learning_rate=1e-3, save_total_limit=1, resume_from_checkpoint="true"))
    msg = str(err.value)
    assert "\n" not in msg
    assert "learning_rate: 0.005 in the checkpoint, 0.001 now" in msg, msg
    assert "checkpoint-4 was written by a run with other settings" in msg, msg
    assert f"resume from {out / 'checkpoint-2'} (written under this run's settings)" in msg, msg
    # B's own checkpoint resumes, with settings that do not decide the run changed (logging, saving, workers)
    own = _train(_cfg(assets, out, learning_rate=1e-3, save_total_limit=1, logging_steps=2, save_steps=3,
                      resume_from_checkpoint=str(out / "checkpoint-2")))
    assert own["steps"] == 4
    # the explicit override resumes from the newest complete checkpoint whatever wrote it, and says so
    forced = _train(_cfg(assets, out, learning_rate=1e-4, resume_from_checkpoint="true", allow_config_change=True,
                         max_steps=5))
    assert forced["steps"] == 5


def test_identity_names_every_decisive_change_and_ignores_the_rest(assets, tmp_path):
    base = run_identity(_cfg(assets, tmp_path / "a"))
    other = run_identity(_cfg(assets, tmp_path / "b", beta=0.5, negatives="tn:2", seed=3, logging_steps=7,
                              save_steps=9, dataloader_num_workers=1, report_to="tensorboard"))
    assert [d[0] for d in identity_differences(base, other)] == ["beta", "negatives", "seed"]
    # the same settings over other records: the data fingerprint differs
    data2 = tmp_path / "train2.jsonl"
    lines = open(assets["data"]).read().splitlines()
    data2.write_text("\n".join(lines[:-1] + [lines[-1].replace("bread", "salt")]) + "\n")
    moved = run_identity(_cfg(assets, tmp_path / "a", dataset=str(data2)))
    assert [d[0] for d in identity_differences(base, moved)] == ["dataset"]
    same_path_new_content = dict(base, data_fingerprint="0" * 32)
    assert identity_differences(base, same_path_new_content)[0][0].startswith("data")
    # the same model path holding other weights (a re-trained start): another run
    import shutil

    model2 = tmp_path / "model"
    shutil.copytree(assets["model"], model2)
    first = run_identity(_cfg(assets, tmp_path / "a", model_name_or_path=str(model2)))
    make_tiny_llama(seed=1, vocab_size=len(make_toy_tokenizer())).save_pretrained(model2)
    again = run_identity(_cfg(assets, tmp_path / "a", model_name_or_path=str(model2)))
    assert [d[0] for d in identity_differences(first, again)] == ["model (content of model_name_or_path)"]
    # a schedule that depends on the run's length: max_steps decides it; a constant one may be extended
    linear = run_identity(_cfg(assets, tmp_path / "a", lr_scheduler_type="linear"))
    longer = run_identity(_cfg(assets, tmp_path / "a", lr_scheduler_type="linear", max_steps=8))
    assert [d[0] for d in identity_differences(linear, longer)] == ["max_steps"]
    assert identity_differences(base, run_identity(_cfg(assets, tmp_path / "a", max_steps=8))) == []
    # how a step is split: free without live batch negatives (split-invariant steps), decisive with them
    tn = run_identity(_cfg(assets, tmp_path / "a", negatives="tn:2"))
    resplit = run_identity(_cfg(assets, tmp_path / "a", negatives="tn:2", per_device_train_batch_size=2,
                                gradient_accumulation_steps=2))
    assert identity_differences(tn, resplit) == []
    bigger = run_identity(_cfg(assets, tmp_path / "a", negatives="tn:2", gradient_accumulation_steps=2))
    assert [d[0] for d in identity_differences(tn, bigger)] == [
        "global batch (per_device_train_batch_size x gradient_accumulation_steps x processes)"]
    bn_resplit = run_identity(_cfg(assets, tmp_path / "a", per_device_train_batch_size=2,
                                   gradient_accumulation_steps=2))
    assert [d[0] for d in identity_differences(base, bn_resplit)] == [
        "gradient_accumulation_steps", "per_device_train_batch_size"]


def test_resume_auto_takes_this_runs_newest_checkpoint_or_starts_afresh(assets, tmp_path, caplog):
    """``auto`` (what ``seqcpo reproduce`` passes for an arm folder with checkpoints) never resumes another run."""
    out = tmp_path / "run"
    _train(_cfg(assets, out, learning_rate=5e-3, max_steps=4, save_steps=2))  # A: checkpoint-2, checkpoint-4
    with pytest.raises(_Killed):
        _train(_cfg(assets, out, learning_rate=1e-3), callbacks=[_KillAfterSave(1)])  # B: checkpoint-1
    with caplog.at_level(logging.INFO, logger="seqcpo"):
        b = _train(_cfg(assets, out, learning_rate=1e-3, max_steps=2, resume_from_checkpoint="auto"))
    assert f"resume: from {out / 'checkpoint-1'}" in caplog.text and b["steps"] == 2
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="seqcpo"):
        c = _train(_cfg(assets, out, learning_rate=2e-3, max_steps=1, resume_from_checkpoint="auto"))
    assert "starting afresh" in caplog.text and c["steps"] == 1
    assert read_marker(str(out / "checkpoint-4"))["identity"]["config"]["learning_rate"] == 5e-3  # left alone
    # C's checkpoint-1 did not delete B's: B's was moved aside, kept whole (complete marker and all)
    assert read_marker(str(out / "checkpoint-1"))["identity"]["config"]["learning_rate"] == 2e-3
    aside = [p for p in out.iterdir() if p.name.startswith("other-run-") and p.name.endswith("-checkpoint-1")]
    assert len(aside) == 1 and read_marker(str(aside[0]))["identity"]["config"]["learning_rate"] == 1e-3


def test_a_fresh_run_moves_another_runs_final_model_aside_instead_of_replacing_it(assets, tmp_path, caplog):
    """Defect (campaign 3): a run into a folder holding another run's final/ replaced it without a word; with
    save_strategy no that was the only copy of that model. It is now moved aside whole, with that run's files."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    _train(_cfg(assets, out, learning_rate=5e-3, max_steps=2, save_strategy="no"))
    first = load_file(str(out / "final" / "model.safetensors"))
    with caplog.at_level(logging.WARNING, logger="seqcpo"):
        _train(_cfg(assets, out, learning_rate=1e-3, max_steps=2, save_strategy="no"))
    assert "held the final model of another run" in caplog.text
    aside = [p for p in out.iterdir() if p.name.startswith("other-run-") and p.name.endswith("-final")]
    assert len(aside) == 1 and read_marker(str(aside[0]))["identity"]["config"]["learning_rate"] == 5e-3
    kept = load_file(str(aside[0] / "model.safetensors"))
    assert all(torch.equal(first[k], kept[k]) for k in first)
    assert "learning_rate: 0.005" in (aside[0] / "run-seqcpo_config.yaml").read_text()
    assert read_marker(str(out / "final"))["identity"]["config"]["learning_rate"] == 1e-3


# ---------------------------------------------------------------- completeness


def _tear_next_checkpoint(monkeypatch, at_step):
    """Make the write of checkpoint-``at_step`` die half-way (weights and optimizer written, no RNG/state)."""
    from transformers import Trainer

    real = Trainer._save_rng_state

    def dying(self, output_dir):
        if self.state.global_step == at_step:
            raise _Killed(at_step)
        return real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", dying)


def test_resume_true_skips_a_torn_checkpoint_and_matches_the_uninterrupted_run(assets, tmp_path, monkeypatch, caplog):
    """A kill -9 while checkpoint-3 was being written: resume used to pick the torn folder and fail on it."""
    full = _train(_cfg(assets, tmp_path / "full"))
    out = tmp_path / "run"
    _tear_next_checkpoint(monkeypatch, 3)
    with pytest.raises(_Killed):
        _train(_cfg(assets, out))
    monkeypatch.undo()
    assert (out / "checkpoint-3").is_dir() and read_marker(str(out / "checkpoint-3")) is None
    assert read_marker(str(out / "checkpoint-2"))["step"] == 2
    with caplog.at_level(logging.INFO, logger="seqcpo"):
        resumed = _train(_cfg(assets, out, resume_from_checkpoint="true"))
    text = caplog.text
    assert "checkpoint-3 is incomplete" in text and f"resume: from {out / 'checkpoint-2'}" in text
    got = _losses(resumed["trainer"].state.log_history)
    assert got[-2:] == pytest.approx(_losses(full["trainer"].state.log_history)[-2:], rel=1e-5, abs=1e-6)
    assert read_marker(str(out / "checkpoint-3"))["step"] == 3  # the torn folder was rewritten whole
    assert read_marker(str(out / "final"))["step"] == 4


def test_explicit_resume_from_a_torn_checkpoint_is_refused(assets, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _tear_next_checkpoint(monkeypatch, 2)
    with pytest.raises(_Killed):
        _train(_cfg(assets, out))
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="checkpoint-2'?: the checkpoint is incomplete"):
        _train(_cfg(assets, out, resume_from_checkpoint=str(out / "checkpoint-2")))
    # a file truncated after the marker was written: no longer complete
    ckpt1 = out / "checkpoint-1"
    assert read_marker(str(ckpt1)) is not None
    with open(ckpt1 / "optimizer.pt", "r+b") as fh:
        fh.truncate(10)
    assert read_marker(str(ckpt1)) is None
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        _train(_cfg(assets, out, resume_from_checkpoint="true"))


def test_rotation_keeps_the_newest_complete_checkpoint_not_a_torn_one(assets, tmp_path):
    """A torn checkpoint-9 left by a killed run: rotation (save_total_limit=1) protected it as "the most recent"
    and deleted every checkpoint the new run wrote."""
    out = tmp_path / "run"
    torn = out / "checkpoint-9"
    torn.mkdir(parents=True)
    (torn / "model.safetensors").write_bytes(b"half a file")
    _train(_cfg(assets, out, max_steps=3, save_total_limit=1))
    kept = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert kept == ["checkpoint-3", "checkpoint-9"]
    assert read_marker(str(out / "checkpoint-3"))["step"] == 3
    assert (torn / "model.safetensors").read_bytes() == b"half a file"  # left alone


# ---------------------------------------------------------------- non-finite loss / gradient


def _all_finite(folder):
    return all(torch.isfinite(t).all() for t in load_file(os.path.join(folder, "model.safetensors")).values())


def test_nan_loss_stops_the_cli_with_the_step_and_keeps_the_last_good_checkpoint(assets, tmp_path, monkeypatch, capsys):
    """A loss that turns NaN at step 3: the run used to log loss 0.0, write NaN weights into every later
    checkpoint and final/, and exit 0."""
    from seqcpo.cli import main
    from seqcpo.training.trainer import SeqCPOTrainer

    real = SeqCPOTrainer.compute_loss

    def poisoned(self, model, inputs, *args, **kwargs):
        loss = real(self, model, inputs, *args, **kwargs)
        return loss * float("nan") if self.state.global_step >= 2 else loss

    monkeypatch.setattr(SeqCPOTrainer, "compute_loss", poisoned)
    out = tmp_path / "run"
    argv = ["train"]
    for k, v in _over(assets, out).items():
        argv += [f"--{k}", str(v)]
    rc = main(argv)
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert rc == 3 and "Traceback" not in err
    assert last.startswith("seqcpo: error: training stopped at step 3: the loss is nan"), last
    assert f"the last complete checkpoint is {out / 'checkpoint-2'}" in last, last
    names = sorted(p.name for p in out.iterdir())
    assert "checkpoint-3" not in names and "checkpoint-4" not in names and "final" not in names, names
    assert read_marker(str(out / "checkpoint-2"))["step"] == 2 and _all_finite(out / "checkpoint-2")
    state = json.load(open(out / "checkpoint-2" / "trainer_state.json"))
    assert all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in state["log_history"] if "loss" in h)


def test_exploding_learning_rate_stops_before_weights_or_checkpoints_turn_nan(assets, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"training stopped at step \d+: the (loss|gradient norm)") as err:
        _train(_cfg(assets, out, learning_rate=1e30, max_grad_norm=0.0, max_steps=6))
    assert not (out / "final").exists()
    for ckpt in out.glob("checkpoint-*"):
        assert read_marker(str(ckpt)) is not None and _all_finite(ckpt), ckpt
    step = int(str(err.value).split("step ")[1].split(":")[0])
    assert not (out / f"checkpoint-{step}").exists()


def test_a_nan_gradient_with_a_finite_loss_stops_before_the_optimizer_step(assets, tmp_path):
    """Backward yields NaN in one weight's gradient at step 2: the step is refused and the weights stay finite."""

    class PoisonGrad(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            self.model = model
            if state.global_step == 1:
                next(model.parameters()).register_hook(lambda g: g * float("nan"))

    out = tmp_path / "run"
    poison = PoisonGrad()
    with pytest.raises(NonFiniteError, match="step 2: the gradient norm is nan"):
        _train(_cfg(assets, out), callbacks=[poison])
    assert all(torch.isfinite(p).all() for p in poison.model.parameters())
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-1"]


def test_non_finite_metrics_are_never_logged_as_numbers():
    logs = finite_logs({"loss": float("nan"), "eval_loss": float("inf"), "grad_norm": 1.5, "epoch": 1, "ok": True})
    assert logs == {"loss": None, "eval_loss": None, "grad_norm": 1.5, "epoch": 1, "ok": True}
    json.dumps(logs, allow_nan=False)  # valid JSON for log_history.json


# ---------------------------------------------------------------- output folder


def test_a_failed_checkpoint_write_is_one_line_naming_output_dir_and_the_last_good_checkpoint(
    assets, tmp_path, monkeypatch, capsys
):
    import errno

    from transformers import Trainer

    from seqcpo.cli import main

    real = Trainer._save_rng_state

    def disk_full(self, output_dir):
        if self.state.global_step == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", disk_full)
    out = tmp_path / "run"
    argv = ["train"]
    for k, v in _over(assets, out).items():
        argv += [f"--{k}", str(v)]
    rc = main(argv)
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert rc == 3 and "Traceback" not in err
    assert re.fullmatch(
        rf"seqcpo: error: output_dir='{re.escape(str(out))}': writing checkpoint-3 failed \(No space left on device; "
        rf"a checkpoint needs about [0-9.]+ MB\); the last complete checkpoint is {re.escape(str(out / 'checkpoint-2'))}",
        last), last
    assert not (out / "checkpoint-3").exists() and not (out / "final").exists()  # the partial folder gave its space back



@pytest.mark.parametrize("where", ["file", "under_file", "proc"])
def test_unusable_output_dir_is_one_line_naming_output_dir(assets, tmp_path, capsys, where):
    from seqcpo.cli import main

    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    out = {"file": blocker, "under_file": blocker / "run", "proc": "/proc/seqcpo-no-such/run"}[where]
    argv = ["train"]
    for k, v in _over(assets, out).items():
        argv += [f"--{k}", str(v)]
    rc = main(argv)
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert rc == 2 and "Traceback" not in err
    # given on the command line: the flag is named (not the YAML file, not the bare setting)
    assert last.startswith("seqcpo: error: --output_dir") and str(out) in last, last


def test_negatives_into_a_file_is_one_line_naming_out(assets, tmp_path, capsys):
    from seqcpo.cli import main

    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    argv = ["negatives", "--out", str(blocker)]
    for k, v in _over(assets, tmp_path / "run").items():
        argv += [f"--{k}", str(v)]
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("seqcpo: error: --out") and str(blocker) in last and "folder" in last, last


@pytest.mark.integration  # two CLI processes (~15-30 s); the in-process tear test above covers the fast suite
def test_sigkill_during_a_checkpoint_write_then_cli_resume(assets, tmp_path):
    """A real SIGKILL of the `seqcpo train` process while checkpoint-3 is half written (after its weights and
    optimizer, before its RNG and trainer state), then `--resume_from_checkpoint true` from the command line."""
    import subprocess
    import sys

    out = tmp_path / "run"
    argv = []
    for k, v in _over(assets, out).items():
        argv += [f"--{k}", str(v)]
    killer = (
        "import os, signal, sys\n"
        "from transformers import Trainer\n"
        "real = Trainer._save_rng_state\n"
        "def dying(self, d):\n"
        "    if self.state.global_step == 3:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(self, d)\n"
        "Trainer._save_rng_state = dying\n"
        "from seqcpo.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run([sys.executable, "-c", killer, "train", *argv], capture_output=True, text=True, env=env,
                           timeout=600)
    assert first.returncode == -9, first.stderr[-2000:]
    assert (out / "checkpoint-3" / "optimizer.pt").exists()
    assert read_marker(str(out / "checkpoint-3")) is None
    second = subprocess.run([sys.executable, "-m", "seqcpo.cli", "train", *argv, "--resume_from_checkpoint", "true"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "checkpoint-3 is incomplete" in second.stderr and "resume: from" in second.stderr
    assert f"{out / 'checkpoint-2'} (step 2, complete)" in second.stderr
    assert read_marker(str(out / "final"))["step"] == 4


def test_a_second_run_into_a_folder_in_use_is_refused_in_one_line_and_the_lock_dies_with_its_holder(
        assets, tmp_path, capsys):
    """Defect: two runs into one output_dir (a job re-launched while the first still ran, two grid workers on one
    arm) interleaved their checkpoints. While another process holds the folder, `seqcpo train` stops in one line
    naming the folder and the holder and writes nothing; once the holder is gone (its lock released as by exit or
    kill -9) the same command trains."""
    import fcntl

    from seqcpo.cli import main
    from seqcpo.training.checkpoints.saving import TRAIN_LOCK

    out = tmp_path / "run"
    out.mkdir()
    argv = ["train"]
    for k, v in _over(assets, out, max_steps=1, save_steps=1).items():
        argv += [f"--{k}", str(v)]
    holder = os.open(out / TRAIN_LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(holder, b"pid 4242 on elsewhere")
    try:
        rc = main(argv)
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert rc == 2 and "Traceback" not in err
        assert last.startswith("seqcpo: error: --output_dir") and "another run is training" in last, last
        assert "pid 4242 on elsewhere" in last
        assert sorted(p.name for p in out.iterdir()) == [TRAIN_LOCK]  # nothing written
    finally:
        os.close(holder)  # the holder exits
    assert main(argv) == 0
    assert (out / "final").is_dir() and (out / "checkpoint-1").is_dir()
    assert f"pid {os.getpid()}" in (out / TRAIN_LOCK).read_text()
