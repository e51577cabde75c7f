"""Writing checkpoints a resume can trust: enough free disk checked first, the completeness marker written last,
rotation after it, and any write failure (a full disk included) ended in one line naming the folder.

Free space: before each checkpoint the disk under ``output_dir`` must hold one more checkpoint, estimated as the
size of this run's previous complete checkpoint, or (first one) the weights plus AdamW's two fp32 moments per
trainable parameter, plus :data:`SLACK_BYTES`; a run stops before it writes rather than in the middle.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
from typing import Any, Iterator

try:
    import fcntl
except ImportError:  # not a POSIX system: runs are not guarded against a second run into their folder
    fcntl = None

import torch

from seqcpo.training.checkpoints.errors import CheckpointWriteError
from seqcpo.training.checkpoints.identity import identity_key, run_identity
from seqcpo.training.checkpoints.markers import (
    COMPLETE_MARKER,
    checkpoint_bytes,
    list_checkpoints,
    newest_complete,
    read_marker,
    write_complete_marker,
)

logger = logging.getLogger("seqcpo")

SLACK_BYTES = 32 << 20  # config, tokenizer, trainer state, RNG state and filesystem overhead


def rotate(run_dir: str, limit: int | None, key: str, protect: tuple[str | None, ...] = ()) -> None:
    """Keep at most ``limit`` complete checkpoints of this run (identity ``key``), the newest always; torn folders
    and other runs' checkpoints are neither counted nor deleted."""
    if limit is None or limit <= 0:
        return
    ours = [path for _, path in list_checkpoints(run_dir)
            if (m := read_marker(path)) is not None and m.get("identity_key") == key]
    keep = set(ours[-limit:]) | {os.path.abspath(p) for p in protect if p}
    for path in ours[:-1]:
        if path not in keep and os.path.abspath(path) not in keep:
            logger.info("Deleting older checkpoint %s (save_total_limit=%d)", path, limit)
            shutil.rmtree(path, ignore_errors=True)


def estimate_checkpoint_bytes(trainer, run_dir: str, key: str) -> int:
    """Bytes the next checkpoint needs: this run's newest complete checkpoint's size, else weights + AdamW
    state (two fp32 moments per trainable parameter; none with ``save_only_model``) + :data:`SLACK_BYTES`."""
    for _, path in reversed(list_checkpoints(run_dir)):
        marker = read_marker(path)
        if marker is not None and marker.get("identity_key") == key:
            return checkpoint_bytes(marker) + SLACK_BYTES
    model = trainer.accelerator.unwrap_model(trainer.model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = 0 if trainer.args.save_only_model else 8 * trainable
    return weights + optimizer + SLACK_BYTES


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_free_space(trainer, run_dir: str, folder: str, key: str) -> None:
    """Raise :class:`CheckpointWriteError` on every process when the disk under ``run_dir`` cannot hold the next
    checkpoint (decided on the saving process and shared, so no process is left waiting)."""
    need, free = estimate_checkpoint_bytes(trainer, run_dir, key), None
    short = 0.0
    if trainer.args.should_save:
        free = shutil.disk_usage(run_dir).free
        short = float(free < need)
    if trainer.args.world_size > 1:
        flag = torch.tensor([short], device=trainer.args.device)
        short = float(trainer.accelerator.reduce(flag, reduction="sum").item())
    if short:
        last, _ = newest_complete(run_dir)
        where = f"{_gb(free)} free" if free is not None else "not enough free on the saving process's disk"
        raise CheckpointWriteError(
            f"output_dir={trainer.args.output_dir!r}: not enough disk for {os.path.basename(folder)}: it needs about "
            f"{_gb(need)}, {where}; nothing was written. Free space (or lower save_total_limit, or set "
            "save_only_model: true where no resume is needed) and resume: "
            + (f"the last complete checkpoint is {last}" if last else "no checkpoint was written yet")
        )


def set_aside(run_dir: str, folder: str, marker: dict) -> str:
    """Move another run's complete ``folder`` (its ``marker``) to ``run_dir/other-run-<key>-<name>``, whole, under
    a name no resume or rotation reads; returns the new path."""
    aside = os.path.join(run_dir, f"other-run-{str(marker.get('identity_key'))[:12]}-{os.path.basename(folder)}")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(folder, aside)
    return aside


def _clear_same_step(trainer, run_dir: str, folder: str) -> None:
    """Make room for ``folder``: another run's complete checkpoint there is moved aside, never deleted; a torn
    folder of this step, or this run's own, is removed whole (never mixed with the new files)."""
    other = read_marker(folder)
    if other is not None and other.get("identity_key") != identity_key(trainer_identity(trainer)):
        # another run's complete checkpoint at this step (resume "auto" started afresh beside it): kept, moved
        # aside under a name no resume or rotation reads
        aside = set_aside(run_dir, folder, other)
        logger.warning("%s was written by another run (other settings): moved to %s", folder, aside)
        return
    marker = os.path.join(folder, COMPLETE_MARKER)
    if os.path.exists(marker):
        os.remove(marker)
    shutil.rmtree(folder, ignore_errors=True)


def write_errors() -> tuple[type, ...]:
    """What a failed write raises: OSError (ENOSPC, EIO, ...), safetensors' SafetensorError, torch's RuntimeError."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # older safetensors
        return (OSError, RuntimeError)
    return (OSError, RuntimeError, SafetensorError)


def save_complete_checkpoint(trainer, save_checkpoint, model, trial) -> None:
    """``Trainer._save_checkpoint`` with a free-space check first, a completeness marker written last and rotation
    done after it.

    ``save_checkpoint`` is the parent class's method: it writes weights, optimizer, scheduler, RNG and trainer
    state. Its own rotation is turned off for the call (it would count torn folders and could delete the newest
    complete checkpoint before the new one is marked). A failed write removes the partial folder (it could never
    be resumed) and raises :class:`CheckpointWriteError`.
    """
    args = trainer.args
    run_dir = trainer._get_output_dir(trial=trial)
    folder = os.path.join(run_dir, f"checkpoint-{trainer.state.global_step}")
    identity = trainer_identity(trainer)
    if args.should_save and os.path.isdir(folder):
        _clear_same_step(trainer, run_dir, folder)
    trainer.accelerator.wait_for_everyone()
    check_free_space(trainer, run_dir, folder, identity_key(identity))
    limit = args.save_total_limit
    args.save_total_limit = None
    try:
        save_checkpoint(model, trial)
        trainer.accelerator.wait_for_everyone()  # every process's shards are written before the marker
        if args.should_save:
            clock = getattr(trainer, "seqcpo_seconds", None)  # the run's time so far (seqcpo.training.run)
            timing = {"seconds": clock(), **getattr(trainer, "seqcpo_untimed", {})} if clock else None
            write_complete_marker(folder, trainer.state.global_step, identity, timing)
            rotate(run_dir, limit, identity_key(identity), protect=(trainer.state.best_model_checkpoint, folder))
    except write_errors() as e:
        raise _write_failed(trainer, run_dir, folder, e) from e
    finally:
        args.save_total_limit = limit


def _write_failed(trainer, run_dir: str, folder: str, err: BaseException) -> CheckpointWriteError:
    text = str(err).strip()
    why = getattr(err, "strerror", None) or (text.splitlines()[0][:200] if text else type(err).__name__)
    if "No space left" in str(err) or "StorageFull" in str(err):
        why = "No space left on device"
    need = estimate_checkpoint_bytes(trainer, run_dir, identity_key(trainer_identity(trainer)))
    if trainer.args.should_save and read_marker(folder) is None:
        shutil.rmtree(folder, ignore_errors=True)  # half a checkpoint can never be resumed: give its space back
    last, _ = newest_complete(run_dir)
    return CheckpointWriteError(
        f"output_dir={trainer.args.output_dir!r}: writing {os.path.basename(folder)} failed ({why}; a checkpoint "
        f"needs about {_gb(need)}); "
        + (f"the last complete checkpoint is {last}" if last else "no complete checkpoint was kept")
    )


def trainer_identity(trainer) -> dict[str, Any]:
    """The identity of the run ``trainer`` is doing (computed once, then kept on the trainer)."""
    identity = getattr(trainer, "run_identity", None)
    if identity is None:
        identity = run_identity(trainer.cfg, trainer.args.world_size)
        trainer.run_identity = identity
    return identity


def prepare_output_dir(output_dir: str, option: str = "output_dir") -> None:
    """Create ``output_dir`` (or check it) and prove it writable; a one-line :class:`ConfigError` naming
    ``option`` (the setting or flag that gave the folder) otherwise."""
    from seqcpo.training.config import ConfigError

    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConfigError(f"{option}={output_dir!r}: a file is in the way (expected a folder)")
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".seqcpo-write-test-{os.getpid()}")
        with open(probe, "wb") as fh:
            fh.write(b"ok")
        os.remove(probe)
    except OSError as e:
        reason = e.strerror or str(e)
        raise ConfigError(f"{option}={output_dir!r}: cannot write there ({reason})") from None


def probe_output_dir(output_dir: str, option: str = "output_dir") -> None:
    """:func:`prepare_output_dir`'s proof, leaving nothing behind: the folders it had to create are removed
    again (``--dry-run``)."""
    created, p = [], os.path.abspath(output_dir)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        created.append(p)  # deepest first
        p = os.path.dirname(p)
    try:
        prepare_output_dir(output_dir, option)
    finally:
        for folder in created:
            try:
                os.rmdir(folder)
            except OSError:
                break


TRAIN_LOCK = ".seqcpo-train.lock"


@contextlib.contextmanager
def output_dir_lock(output_dir: str, option: str = "output_dir") -> Iterator[None]:
    """Hold ``output_dir`` for one training run: a second run into the same folder (another terminal, a grid
    worker, a re-launched job while the first still runs) is refused in one line naming the folder and the
    holder's pid, instead of two runs interleaving their checkpoints. An advisory ``flock`` on
    ``output_dir/.seqcpo-train.lock``: the kernel releases it when the holder exits, even by kill -9, so a lock
    is never stale. Only the launch's rank 0 takes it (the other processes of one launch share the folder). On a
    file system without ``flock`` (some network mounts) the run goes on unguarded, with a warning. The file is
    left in place: removing it could let two later runs lock two different files."""
    from seqcpo.training.config import ConfigError

    if fcntl is None or int(os.environ.get("RANK", "0") or 0) != 0:
        yield
        return
    path = os.path.join(output_dir, TRAIN_LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            raise ConfigError(f"{option}={output_dir!r}: another run is training into this folder ({holder}); "
                              "wait for it to finish or choose another output_dir") from None
        except OSError as e:
            logger.warning("%s=%r: cannot lock the folder (%s); two runs into it would not be stopped",
                           option, output_dir, e.strerror or e)
            yield
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
