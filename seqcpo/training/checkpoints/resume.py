"""Resuming: which checkpoint a run resumes from, and what it checks before it trusts one.

``resume_from_checkpoint: true`` takes the newest complete checkpoint whose files still hold what was written
(sizes, then every file's sha256: :mod:`~seqcpo.training.checkpoints.markers`); a torn or corrupted one is skipped
with a warning and the one before it is used. A checkpoint saved with ``save_only_model`` (no optimizer, scheduler
or RNG state) cannot be resumed; its state files are read with ``torch.load(weights_only=True)`` first, so a
crafted pickle is refused with the file named. :func:`finished_step` tells a run that already reached its length.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from seqcpo.training.checkpoints.identity import identity_differences
from seqcpo.training.checkpoints.markers import (
    COMPLETE_MARKER,
    list_checkpoints,
    read_marker,
    verify_checksums,
)

logger = logging.getLogger("seqcpo")

# what a resume needs besides the weights (transformers' file names)
STATE_FILES = ("optimizer.pt", "scheduler.pt")
PICKLED_STATE_SUFFIXES = (".pt", ".pth")


def _wants_resume(value) -> str | None:
    """``None`` (start afresh), ``"newest"``, ``"auto"`` or ``"path"`` for a ``resume_from_checkpoint`` value."""
    if value is None or value is False or (isinstance(value, str) and value.lower() in ("false", "no", "")):
        return None
    if value is True or str(value).lower() in ("true", "latest", "yes"):
        return "newest"
    return "auto" if str(value).lower() == "auto" else "path"


def _trusted(path: str, marker: dict | None) -> tuple[bool, str]:
    """(whether ``path`` is complete and every file still has its recorded sha256, why not)."""
    if marker is None:
        return False, f"no {COMPLETE_MARKER}, or a file it lists is missing or truncated: its write was interrupted"
    bad = verify_checksums(path, marker)
    if bad is not None:
        return False, f"{bad} no longer matches the sha256 recorded when it was written (changed or corrupted)"
    return True, ""


def newest_trusted(run_dir: str, candidates: list[str] | None = None) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest checkpoint of ``run_dir`` (or of ``candidates``) that is complete and intact, and the skipped
    newer ones as ``[(path, why)]``."""
    paths = candidates if candidates is not None else [p for _, p in list_checkpoints(run_dir)]
    skipped = []
    for path in reversed(paths):
        ok, why = _trusted(path, read_marker(path))
        if ok:
            return path, skipped
        skipped.append((path, why))
    return None, skipped


def _choose(cfg, identity: dict[str, Any], mode: str) -> str | None:
    """The checkpoint ``mode`` picks (None: start afresh, for ``auto`` only); ConfigError when none will do."""
    from seqcpo.training.config import ConfigError

    if mode == "path":
        path = str(cfg.resume_from_checkpoint)
        if not os.path.isdir(path):
            raise ConfigError(f"resume_from_checkpoint={path!r}: no such checkpoint folder")
        ok, why = _trusted(path, read_marker(path))
        if not ok:
            what = "incomplete" if "interrupted" in why else "corrupted"
            raise ConfigError(f"resume_from_checkpoint={path!r}: the checkpoint is {what} ({why}); resume from an "
                              "earlier checkpoint")
        return path
    candidates = _matching(cfg.output_dir, identity) if mode == "auto" else None
    path, skipped = newest_trusted(cfg.output_dir, candidates)
    for p, why in skipped:
        logger.warning("resume: %s is incomplete (%s): left alone, not used", p, why)
    if path is None and mode == "auto":
        logger.info("resume: no complete checkpoint of this run's settings in %s: starting afresh "
                    "(resume_from_checkpoint=auto)", cfg.output_dir)
        return None
    if path is None:
        names = ", ".join(os.path.basename(p) for p, _ in skipped)
        raise ConfigError(
            f"resume_from_checkpoint=true: no complete checkpoint in output_dir={cfg.output_dir!r}"
            + (f" ({len(skipped)} incomplete or corrupted: {names})" if skipped else "")
            + "; drop resume_from_checkpoint to start afresh"
        )
    return path


def resolve_resume(cfg, identity: dict[str, Any]) -> str | None:
    """The checkpoint to resume from per ``cfg.resume_from_checkpoint``, checked; None to start fresh.

    ``true`` (or latest/yes) takes the newest complete, intact checkpoint in ``output_dir`` (an error if there is
    none); a path must be a complete, intact checkpoint; either way its identity must match the run's unless
    ``allow_config_change`` is set. ``auto`` takes the newest complete checkpoint written under this run's
    settings, or starts afresh (leaving other checkpoints alone) when there is none: what ``seqcpo reproduce``
    uses for an arm's folder. Raises :class:`~seqcpo.training.config.ConfigError` with one line.
    """
    mode = _wants_resume(cfg.resume_from_checkpoint)
    if mode is None:
        return None
    path = _choose(cfg, identity, mode)
    if path is None:
        return None
    marker = read_marker(path)
    _check_identity(cfg, path, marker, identity)
    check_resumable(path, marker)
    logger.info("resume: from %s (step %s, complete)", path, marker.get("step"))
    return path


def _check_identity(cfg, path: str, marker: dict, identity: dict[str, Any]) -> None:
    from seqcpo.training.config import ConfigError

    diffs = identity_differences(marker.get("identity", {}), identity)
    if not diffs:
        return
    changes = "; ".join(f"{name}: {a!r} in the checkpoint, {b!r} now" for name, a, b in diffs)
    if getattr(cfg, "allow_config_change", False):
        logger.warning("resume: %s was written under other settings (%s); resuming anyway (allow_config_change)",
                       path, changes)
        return
    same = _matching(os.path.dirname(os.path.abspath(path)), identity)
    hint = (f"resume from {same[-1]} (written under this run's settings)" if same
            else "resume with the checkpoint's settings")
    if int(marker.get("version") or 1) < 2 and all(name.startswith(("data (", "model (")) for name, _, _ in diffs):
        hint = ("it was written by an older seqcpo, which fingerprinted content differently: if the data and model "
                f"did not change, set allow_config_change: true; else {hint}")
    raise ConfigError(
        f"resume_from_checkpoint: {path} was written by a run with other settings ({changes}); {hint}, "
        "use another output_dir, or set allow_config_change: true to resume anyway"
    )


def check_resumable(path: str, marker: dict) -> None:
    """A checkpoint holds what a resume restores: optimizer and scheduler state (not a ``save_only_model``
    checkpoint), and its pickled state files are plain tensors and containers (``torch.load(weights_only=True)``,
    which never runs code). ConfigError naming the file otherwise."""
    from seqcpo.training.config import ConfigError

    files = marker.get("files", {})
    missing = [f for f in STATE_FILES if f not in files]
    # FSDP and DeepSpeed keep optimizer state in folders of their own (optimizer_0/, global_step*/...optim_states)
    if missing and (missing != ["optimizer.pt"] or not any("optim" in f for f in files)):
        raise ConfigError(
            f"resume_from_checkpoint: {path} holds no {' or '.join(missing)} (written with save_only_model: true, "
            "weights only): a resume needs the optimizer and scheduler state. Use it as a starting model "
            f"(--model_name_or_path {path}) or resume from a checkpoint saved without save_only_model"
        )
    for rel in sorted(files):
        if rel.endswith(PICKLED_STATE_SUFFIXES):
            why = _unsafe_state(os.path.join(path, rel))
            if why:
                raise ConfigError(
                    f"resume_from_checkpoint: {os.path.join(path, rel)}: refused ({why}); seqcpo reads checkpoint "
                    "state as plain tensors only. Resume from an earlier checkpoint or start afresh"
                )


def _unsafe_state(path: str) -> str | None:
    """Why ``torch.load(weights_only=True)`` refuses ``path`` (None: it loads; tensors memory-mapped, not read)."""
    import pickle

    import torch
    from transformers.trainer_pt_utils import safe_globals  # numpy's RNG state types, as transformers allows

    try:
        with safe_globals():
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError, EOFError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"not loadable as plain tensors: {first[:200]}"
    return None


def _matching(run_dir: str, identity: dict[str, Any]) -> list[str]:
    """The complete checkpoints in ``run_dir`` written under ``identity``'s decisive settings, oldest first."""
    return [p for _, p in list_checkpoints(run_dir)
            if (m := read_marker(p)) is not None and not identity_differences(m.get("identity", {}), identity)]


def finished_step(cfg, path: str) -> int | None:
    """The step of checkpoint ``path`` when the run it belongs to has already reached its length under ``cfg``
    (``max_steps``, or its epochs: the checkpoint's own ``max_steps`` while ``num_train_epochs`` did not grow);
    None while steps remain."""
    try:
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as fh:
            state = json.load(fh)
        step, saved_max = int(state["global_step"]), int(state.get("max_steps") or 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if cfg.max_steps is not None and cfg.max_steps > 0:
        return step if step >= cfg.max_steps else None
    saved_epochs = (read_marker(path) or {}).get("identity", {}).get("config", {}).get("num_train_epochs")
    try:
        grew = float(cfg.num_train_epochs) > float(saved_epochs)
    except (TypeError, ValueError):
        grew = True
    return step if saved_max > 0 and step >= saved_max and not grew else None
