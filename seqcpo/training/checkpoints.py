"""Checkpoints a run can trust: who wrote them, whether they were finished, and that they hold finite weights.

Three guarantees, each closing a class of silent wrong results:

1. **Run identity.** Every ``checkpoint-N`` carries the run's resolved config and a fingerprint of its data
   (:func:`run_identity`). Resuming compares them with the current run and refuses a change in anything that
   decides the result (learning rate, objective, negatives, beta, data, model, seed, batch sizes, ...), naming
   each field and its two values, unless ``allow_config_change`` is set. Settings that only decide where and how
   often things are written or shown (``output_dir``, logging, save frequency, workers, ``report_to``, the resume
   options themselves; :data:`NOT_DECISIVE`) may change.
2. **Completeness.** A checkpoint is complete only when its marker :data:`COMPLETE_MARKER`, written last and
   atomically after every other file is on disk, exists and lists files that are all still there at their sizes.
   ``resume_from_checkpoint: true`` takes the newest complete checkpoint and leaves torn ones alone (with a
   warning); rotation (``save_total_limit``) counts and deletes only complete checkpoints of this run, so a torn or
   foreign folder never displaces the newest good one.
3. **Finite training.** :class:`NonFiniteGuard` stops training before the optimizer step when the loss or the
   gradient norm is NaN or infinite, so no checkpoint (and no ``final/``) is written with broken weights, and
   :func:`finite_logs` keeps non-finite values out of the logs as numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
from typing import Any

import torch

from seqcpo.io import atomic_write_json

logger = logging.getLogger("seqcpo")

COMPLETE_MARKER = "seqcpo_complete.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_MARKER_VERSION = 1

# Settings that do not change what a run computes: where and how often it writes, logs, evaluates or shows
# progress, how data is fed (workers), and the resume options themselves. Everything else decides the run, so a
# field added later is compared by default. ``logps_layout`` and ``logits_chunk_size`` give the same numbers
# (tested in test_fast_paths.py); checkpointing trades memory for time only.
NOT_DECISIVE = frozenset(
    {
        "output_dir", "overwrite_output_dir", "run_name", "project", "report_to", "disable_tqdm",
        "logging_dir", "logging_strategy", "logging_steps", "logging_first_step", "logging_nan_inf_filter",
        "log_on_each_node", "log_level", "log_level_replica", "include_num_input_tokens_seen",
        "include_tokens_per_second", "skip_memory_metrics",
        "save_strategy", "save_steps", "save_total_limit", "save_on_each_node", "save_only_model",
        "save_safetensors", "enable_jit_checkpoint",
        "eval_strategy", "eval_steps", "eval_delay", "eval_on_start", "per_device_eval_batch_size",
        "eval_accumulation_steps", "eval_do_concat_batches", "eval_use_gather_object", "prediction_loss_only",
        "include_for_metrics", "batch_eval_metrics", "bf16_full_eval", "fp16_full_eval",
        "load_best_model_at_end", "metric_for_best_model", "greater_is_better",
        "push_to_hub", "hub_model_id", "hub_strategy", "hub_private_repo", "hub_always_push", "hub_revision",
        "resume_from_checkpoint", "allow_config_change", "ignore_data_skip", "restore_callback_states_from_checkpoint",
        "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
        "dataloader_prefetch_factor", "dataloader_multiprocessing_context",
        "ddp_timeout", "ddp_backend", "ddp_bucket_cap_mb", "torch_empty_cache_steps",
        "do_train", "do_eval", "do_predict", "local_rank", "use_cpu", "no_cuda",
        "logps_layout", "logits_chunk_size", "gradient_checkpointing", "gradient_checkpointing_kwargs",
        "activation_checkpointing", "activation_checkpointing_kwargs", "an_vllm_gpu_memory_utilization",
    }
)
# How long the run is: decisive only when the learning-rate schedule depends on it (a constant schedule may be
# extended by resuming with more steps).
_LENGTH_FIELDS = ("max_steps", "num_train_epochs")
_LENGTH_FREE_SCHEDULES = ("constant", "constant_with_warmup")
# How a step is split: free to change unless batch negatives are drawn live (see _split_matters).
_SPLIT_FIELDS = ("per_device_train_batch_size", "gradient_accumulation_steps")


class TrainingStopped(RuntimeError):
    """Training cannot go on; the one-line message says why, where, and what was kept."""


class NonFiniteError(TrainingStopped):
    """Training met a NaN or infinite loss or gradient norm; the message names the step."""


class CheckpointWriteError(TrainingStopped):
    """A checkpoint could not be written (disk full, folder removed, ...); the message names ``output_dir``."""


# ---------------------------------------------------------------- run identity


def _file_fingerprint(path: str, edge: int = 1 << 20) -> str:
    """Size plus a hash of the first and last ``edge`` bytes: cheap on any size, changes when records do."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    h.update(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(edge))
        if size > edge:
            fh.seek(max(edge, size - edge))
            h.update(fh.read(edge))
    return h.hexdigest()


def _source_fingerprint(path: str) -> str:
    """One file: :func:`_file_fingerprint`. A folder: every file's name, size and first and last 64 KiB (a few
    reads per shard, so a corpus of many shards costs little at start-up; Parquet and safetensors keep their
    metadata at those ends)."""
    if os.path.isfile(path):
        return _file_fingerprint(path)
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode() + b"\0" + _file_fingerprint(full, 1 << 16).encode())
    return h.hexdigest()


def data_fingerprint(cfg) -> str:
    """A hash of everything that decides the training records: the data settings, and the content of the local
    dataset file or folder (size + first and last MiB of each file) or the embedded corpus; a Hub id by name,
    split and subset. With fixed negatives, their folder's manifest is included too.
    """
    from dataclasses import fields

    from seqcpo.data.config import DataConfig

    parts: dict[str, Any] = {f.name: getattr(cfg, f.name) for f in fields(DataConfig)}
    name = str(cfg.dataset)
    path = os.path.expanduser(name)
    if name == "wiki":
        from seqcpo.data.sources import wiki_path

        parts["content"] = _file_fingerprint(wiki_path())
    elif os.path.exists(path):
        parts["content"] = _source_fingerprint(path)
    negatives_path = getattr(cfg, "negatives_path", None)
    if negatives_path and getattr(cfg, "uses_negatives", False):
        manifest = os.path.join(negatives_path, "manifest.json")
        parts["negatives"] = _file_fingerprint(manifest) if os.path.isfile(manifest) else None
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def run_identity(cfg, world_size: int = 1) -> dict[str, Any]:
    """What a checkpoint records about the run that wrote it: the resolved config (no secrets), the data
    fingerprint and the number of processes (with the per-device batch it fixes the global batch)."""
    return {
        "config": json.loads(json.dumps(cfg.to_public_dict(), default=str)),
        "data_fingerprint": data_fingerprint(cfg),
        "model_fingerprint": model_fingerprint(cfg.model_name_or_path),
        "world_size": int(world_size),
    }


def model_fingerprint(name_or_path: str) -> str | None:
    """The starting model's content when it is a local folder (see :func:`_source_fingerprint`): a folder
    rewritten under the same path (say, a re-run MLE model) is another start. None for a Hub id or embedded name."""
    path = os.path.expanduser(str(name_or_path))
    return _source_fingerprint(path)[:32] if os.path.isdir(path) else None


def _split_matters(config: dict[str, Any]) -> bool:
    """Whether how a step is split (per-device batch, accumulation, processes) decides it, not only the global
    batch: steps are split-invariant except for batch negatives (BN) drawn live, which come from each
    micro-batch (NOTES_split.md; tests/test_split_invariance.py)."""
    from seqcpo.training.config import PREFERENCE_OBJECTIVES

    if config.get("objective") not in PREFERENCE_OBJECTIVES or config.get("negatives_path"):
        return False
    return "bn" in {part.split(":")[0].strip().lower() for part in str(config.get("negatives", "")).split(",")}


_GLOBAL_BATCH = "global batch (per_device_train_batch_size x gradient_accumulation_steps x processes)"


def _decisive_view(identity: dict[str, Any], length_free: bool, split_free: bool) -> dict[str, Any]:
    """The settings of ``identity`` that decide the run, by name (with the global batch or the number of
    processes as pseudo-fields)."""
    config = identity.get("config", {})
    skip = set(NOT_DECISIVE) | (set(_LENGTH_FIELDS) if length_free else set()) | (
        set(_SPLIT_FIELDS) if split_free else set())
    view = {k: v for k, v in config.items() if k not in skip}
    world = identity.get("world_size", 1)
    if split_free:
        try:
            view[_GLOBAL_BATCH] = (int(config["per_device_train_batch_size"])
                                   * int(config["gradient_accumulation_steps"]) * int(world))
        except (KeyError, TypeError, ValueError):
            view[_GLOBAL_BATCH] = None
    else:
        view["world_size (training processes)"] = world
    return view


def _length_free(config: dict[str, Any]) -> bool:
    return str(config.get("lr_scheduler_type")) in _LENGTH_FREE_SCHEDULES


def identity_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """The decisive settings that differ between two identities: ``[(field, saved value, current value)]``."""
    old_cfg, new_cfg = saved.get("config", {}), current.get("config", {})
    length_free = _length_free(old_cfg) and _length_free(new_cfg)
    split_free = not _split_matters(old_cfg) and not _split_matters(new_cfg)
    old = _decisive_view(saved, length_free, split_free)
    new = _decisive_view(current, length_free, split_free)
    # a field only one side knows (a seqcpo version that added or dropped an option) is not compared
    diffs = [(name, old[name], new[name]) for name in sorted(set(old) & set(new)) if old[name] != new[name]]
    changed = {d[0] for d in diffs}

    def content(kind: str, label: str, named_by: set[str]) -> None:
        # a content change under unchanged names; a renamed source is already reported by its field
        a, b = saved.get(kind), current.get(kind)
        if a != b and not changed & named_by:
            diffs.append((label, f"fingerprint {str(a)[:12]}", f"fingerprint {str(b)[:12]}"))

    content("data_fingerprint", "data (content of the dataset / negatives)", _data_field_names() | {"negatives_path"})
    content("model_fingerprint", "model (content of model_name_or_path)", {"model_name_or_path"})
    return diffs


def _data_field_names() -> set[str]:
    from dataclasses import fields

    from seqcpo.data.config import DataConfig

    return {f.name for f in fields(DataConfig)}


def identity_key(identity: dict[str, Any]) -> str:
    """A short hash of the decisive part of an identity: two checkpoints of one run share it."""
    config = identity.get("config", {})
    view = _decisive_view(identity, _length_free(config), not _split_matters(config))
    blob = json.dumps([view, identity.get("data_fingerprint"), identity.get("model_fingerprint")], sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- completeness


def _files_with_sizes(folder: str) -> dict[str, int]:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, folder)
            if rel != COMPLETE_MARKER and not name.endswith(".tmp"):
                out[rel] = os.path.getsize(full)
    return out


def _fsync_tree(folder: str) -> None:
    """Flush every file of ``folder`` (and the folder) to disk, so the marker never outlives the data."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_complete_marker(folder: str, step: int, identity: dict[str, Any]) -> None:
    """Mark ``folder`` complete: every file flushed first, then the marker (files + sizes + identity) atomically."""
    _fsync_tree(folder)
    atomic_write_json(
        os.path.join(folder, COMPLETE_MARKER),
        {"version": _MARKER_VERSION, "step": int(step), "files": _files_with_sizes(folder),
         "identity_key": identity_key(identity), "identity": identity},
    )
    _fsync_dir(folder)


def read_marker(folder: str) -> dict[str, Any] | None:
    """The marker of a complete checkpoint, or None when ``folder`` is torn (no marker, or a listed file is missing
    or has another size)."""
    try:
        with open(os.path.join(folder, COMPLETE_MARKER), encoding="utf-8") as fh:
            marker = json.load(fh)
    except (OSError, ValueError):
        return None
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return None
    for rel, size in files.items():
        full = os.path.join(folder, rel)
        if not os.path.isfile(full) or os.path.getsize(full) != size:
            return None
    return marker


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """``[(step, path)]`` of the ``checkpoint-N`` folders in ``run_dir``, oldest step first."""
    if not os.path.isdir(run_dir):
        return []
    out = []
    for name in os.listdir(run_dir):
        m = _CHECKPOINT_RE.match(name)
        if m and os.path.isdir(os.path.join(run_dir, name)):
            out.append((int(m.group(1)), os.path.join(run_dir, name)))
    return sorted(out)


def newest_complete(run_dir: str) -> tuple[str | None, list[str]]:
    """(the complete checkpoint with the highest step or None, the torn checkpoints newer than it)."""
    torn = []
    for _, path in reversed(list_checkpoints(run_dir)):
        if read_marker(path) is not None:
            return path, torn
        torn.append(path)
    return None, torn


def resolve_resume(cfg, identity: dict[str, Any]) -> str | None:
    """The checkpoint to resume from per ``cfg.resume_from_checkpoint``, checked; None to start fresh.

    ``true`` (or latest/yes) takes the newest complete checkpoint in ``output_dir`` (an error if there is none);
    a path must be a complete checkpoint; either way its identity must match the run's unless
    ``allow_config_change`` is set. ``auto`` takes the newest complete checkpoint written under this run's
    settings, or starts afresh (leaving other checkpoints alone) when there is none: what ``seqcpo reproduce``
    uses for an arm's folder. Raises :class:`~seqcpo.training.config.ConfigError` with one line.
    """
    from seqcpo.training.config import ConfigError

    value = cfg.resume_from_checkpoint
    if value is None or value is False or (isinstance(value, str) and value.lower() in ("false", "no", "")):
        return None
    if isinstance(value, str) and value.lower() in ("true", "latest", "auto", "yes") or value is True:
        path, torn = newest_complete(cfg.output_dir)
        for t in torn:
            logger.warning("resume: %s is incomplete (no %s; its write was interrupted): left alone, not used",
                           t, COMPLETE_MARKER)
        if str(value).lower() == "auto":
            ours = _matching(cfg.output_dir, identity)
            if not ours:
                logger.info("resume: no complete checkpoint of this run's settings in %s: starting afresh "
                            "(resume_from_checkpoint=auto)", cfg.output_dir)
                return None
            path = ours[-1]
        if path is None:
            raise ConfigError(
                f"resume_from_checkpoint=true: no complete checkpoint in output_dir={cfg.output_dir!r}"
                + (f" ({len(torn)} incomplete: {', '.join(os.path.basename(t) for t in torn)})" if torn else "")
                + "; drop resume_from_checkpoint to start afresh"
            )
    else:
        path = str(value)
        if not os.path.isdir(path):
            raise ConfigError(f"resume_from_checkpoint={path!r}: no such checkpoint folder")
        if read_marker(path) is None:
            raise ConfigError(
                f"resume_from_checkpoint={path!r}: the checkpoint is incomplete (no {COMPLETE_MARKER}, or a file it "
                "lists is missing or truncated: its write was interrupted); resume from an earlier checkpoint"
            )
    marker = read_marker(path)
    diffs = identity_differences(marker.get("identity", {}), identity)
    if diffs:
        changes = "; ".join(f"{name}: {a!r} in the checkpoint, {b!r} now" for name, a, b in diffs)
        if getattr(cfg, "allow_config_change", False):
            logger.warning("resume: %s was written under other settings (%s); resuming anyway (allow_config_change)",
                           path, changes)
        else:
            same = _matching(os.path.dirname(os.path.abspath(path)), identity)
            hint = (f"resume from {same[-1]} (written under this run's settings)" if same
                    else "resume with the checkpoint's settings")
            raise ConfigError(
                f"resume_from_checkpoint: {path} was written by a run with other settings ({changes}); {hint}, "
                "use another output_dir, or set allow_config_change: true to resume anyway"
            )
    logger.info("resume: from %s (step %s, complete)", path, marker.get("step"))
    return path


def _matching(run_dir: str, identity: dict[str, Any]) -> list[str]:
    """The complete checkpoints in ``run_dir`` written under ``identity``'s decisive settings, oldest first."""
    return [p for _, p in list_checkpoints(run_dir)
            if (m := read_marker(p)) is not None and not identity_differences(m.get("identity", {}), identity)]


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


def save_complete_checkpoint(trainer, save_checkpoint, model, trial) -> None:
    """``Trainer._save_checkpoint`` with a completeness marker written last and rotation done after it.

    ``save_checkpoint`` is the parent class's method: it writes weights, optimizer, scheduler, RNG and trainer
    state. Its own rotation is turned off for the call (it would count torn folders and could delete the newest
    complete checkpoint before the new one is marked).
    """
    args = trainer.args
    run_dir = trainer._get_output_dir(trial=trial)
    folder = os.path.join(run_dir, f"checkpoint-{trainer.state.global_step}")
    if args.should_save and os.path.isdir(folder):
        other = read_marker(folder)
        if other is not None and other.get("identity_key") != identity_key(trainer_identity(trainer)):
            # another run's complete checkpoint at this step (resume "auto" started afresh beside it): kept, moved
            # aside under a name no resume or rotation reads, never deleted
            aside = os.path.join(run_dir, f"other-run-{str(other.get('identity_key'))[:12]}-{os.path.basename(folder)}")
            logger.warning("%s was written by another run (other settings): moved to %s", folder, aside)
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(folder, aside)
        else:
            # a torn folder of this step, or this run's own: replaced whole, never mixed with the new files
            marker = os.path.join(folder, COMPLETE_MARKER)
            if os.path.exists(marker):
                os.remove(marker)
            shutil.rmtree(folder, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    limit = args.save_total_limit
    args.save_total_limit = None
    try:
        save_checkpoint(model, trial)
        trainer.accelerator.wait_for_everyone()  # every process's shards are written before the marker
        if args.should_save:
            identity = trainer_identity(trainer)
            write_complete_marker(folder, trainer.state.global_step, identity)
            rotate(run_dir, limit, identity_key(identity), protect=(trainer.state.best_model_checkpoint, folder))
    except OSError as e:
        last, _ = newest_complete(run_dir)
        raise CheckpointWriteError(
            f"output_dir={args.output_dir!r}: writing {os.path.basename(folder)} failed ({e.strerror or e}); "
            + (f"the last complete checkpoint is {last}" if last else "no complete checkpoint was kept")
        ) from e
    finally:
        args.save_total_limit = limit


def trainer_identity(trainer) -> dict[str, Any]:
    """The identity of the run ``trainer`` is doing (computed once, then kept on the trainer)."""
    identity = getattr(trainer, "run_identity", None)
    if identity is None:
        identity = run_identity(trainer.cfg, trainer.args.world_size)
        trainer.run_identity = identity
    return identity


# ---------------------------------------------------------------- finite training


def _as_float(x) -> float:
    if isinstance(x, torch.Tensor):
        return float(x.detach().float().reshape(-1)[0].item()) if x.numel() == 1 else float("nan")
    return float(x)


class NonFiniteGuard:
    """Stops training at the first NaN or infinite loss (any micro-batch) or gradient norm, before the optimizer
    step, on every process at once (the decision is reduced across processes, so none is left waiting)."""

    def __init__(self):
        self._bad_loss: float | None = None

    def note_loss(self, loss) -> None:
        """Record a micro-batch's loss (after its backward); the verdict comes with the step's gradient norm."""
        value = _as_float(loss)
        if not math.isfinite(value) and self._bad_loss is None:
            self._bad_loss = value

    def check(self, grad_norm, trainer) -> None:
        """Raise :class:`NonFiniteError` if this step's loss or gradient norm is not finite (anywhere)."""
        bad_loss, self._bad_loss = self._bad_loss, None
        norm = _as_float(grad_norm) if grad_norm is not None else 0.0
        flags = torch.tensor([float(bad_loss is not None), float(not math.isfinite(norm))])
        if trainer.args.world_size > 1:
            flags = trainer.accelerator.reduce(flags.to(trainer.args.device), reduction="sum").cpu()
        if flags.sum().item() == 0:
            return
        step = trainer.state.global_step + 1  # the step being taken; the last saved one is at most global_step
        what = []
        if flags[0] > 0:
            what.append(f"the loss is {bad_loss}" if bad_loss is not None
                        else "the loss is not finite on another process")
        if flags[1] > 0:
            what.append(f"the gradient norm is {norm}")
        last, _ = newest_complete(trainer.args.output_dir)
        raise NonFiniteError(
            f"training stopped at step {step}: {' and '.join(what)}; the step was not taken and nothing after it "
            "saved; " + (f"the last complete checkpoint is {last}" if last else "no checkpoint was written yet")
            + " (lower learning_rate, check beta, cpo_lambda and the data)"
        )


def finite_logs(logs: dict[str, Any]) -> dict[str, Any]:
    """``logs`` with every non-finite number replaced by None (shown as missing, never as a number)."""
    out = {}
    for k, v in logs.items():
        if isinstance(v, (float, int)) and not isinstance(v, bool) and not math.isfinite(v):
            logger.warning("metric %s is %s: logged as missing", k, v)
            v = None
        out[k] = v
    return out


# ---------------------------------------------------------------- output folder


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
