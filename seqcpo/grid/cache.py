"""The stage cache: fingerprints of a stage's inputs, its ``done.json``, and :func:`cached_stage`.

Every stage ends by writing ``done.json`` atomically (``{"stage", "fingerprint", "finished_utc", ...}``); a stage
whose ``done.json`` holds the fingerprint of its current inputs is skipped, so an interrupted grid resumes where it
stopped. The values below are FROZEN for grids in progress: a change to them, or to what a fingerprint hashes,
redoes (or refuses) finished stages and must say so in its commit (tests/test_grid.py pins the fingerprints).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from seqcpo.evaluation.config import EvalConfig
from seqcpo.io import atomic_write_json

logger = logging.getLogger("seqcpo")

# how the paired stage computes its intervals: a change redoes every paired stage (they are cheap)
PAIRED_METHOD = "per-item percentile; set-level half-sampling"
# bump when the evaluate stage writes something new (per-item scores, features): old stages are redone
EVALUATE_VERSION = 2

# Fields that decide what a run logs, saves or shows, never its weights (training is deterministic on CPU and these
# leave every random draw alone: tests/test_quality.py, tests/test_training.py). They are left out of the training
# fingerprint so that a finished arm stays finished when they change.
BOOKKEEPING_FIELDS = frozenset({
    "logging_steps", "logging_strategy", "logging_first_step", "logging_dir", "run_name", "report_to",
    "disable_tqdm", "save_strategy", "save_steps", "save_total_limit", "save_only_model",
    "eval_strategy", "eval_steps", "per_device_eval_batch_size", "dataloader_num_workers",
    "quality_examples", "quality_split", "quality_embeddings", "quality_samples",
})

# what decides an untrained model's weights
MODEL_FIELDS = ("model_name_or_path", "model_dtype", "trust_remote_code", "attn_implementation")


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able value (the inputs of a stage)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weight_fields(overrides: dict[str, Any]) -> dict[str, Any]:
    """An arm's fields less :data:`BOOKKEEPING_FIELDS`: what its trained weights depend on.

    >>> weight_fields({"learning_rate": 1e-5, "logging_steps": 5, "eval_steps": 50})
    {'learning_rate': 1e-05}
    """
    return {k: v for k, v in overrides.items() if k not in BOOKKEEPING_FIELDS}


def non_default_fields(obj) -> dict[str, Any]:
    """A dataclass's fields that differ from their defaults: a fingerprint of it stays the same when a later
    version adds a field (at its default), and changes when a value or a default that applies changes."""
    out = {}
    for f in dataclasses.fields(obj):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        value = getattr(obj, f.name)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING or value != default:
            out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


def scoring_key(ev: EvalConfig) -> dict:
    """What decides the scores of given generations (the evaluate stage's fingerprint; frozen)."""
    return {"judge": non_default_fields(ev.judge), "order": ev.order, "order_seed": ev.order_seed, "mauve": ev.mauve,
            "baseline": ev.baseline}


def now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_done(folder: Path) -> dict | None:
    """The stage's ``done.json``, or None when the stage has not finished (or its mark is damaged: not a JSON
    object with a fingerprint, so the stage is redone)."""
    try:
        done = json.loads((folder / "done.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError: JSON errors and bytes that are not UTF-8
        return None
    return done if isinstance(done, dict) and isinstance(done.get("fingerprint"), str) else None


def is_current(folder: Path, fp: str) -> bool:
    """Whether the stage in ``folder`` finished with inputs of fingerprint ``fp``."""
    done = read_done(folder)
    return done is not None and done["fingerprint"] == fp


def write_done(folder: Path, stage: str, fp: str, info: dict) -> dict:
    """Mark the stage finished (atomically, last): ``{"stage", "fingerprint", "finished_utc", **info}``."""
    done = {"stage": stage, "fingerprint": fp, "finished_utc": now_utc(), **info}
    atomic_write_json(folder / "done.json", done)
    return done


def cached_stage(folder: Path, fp: str, make: Callable[[], dict], what: str = "stage",
                 complete: Callable[[Path], bool] | None = None, force: bool = False) -> dict:
    """The stage's ``done.json`` when it finished with these inputs (and ``complete(folder)`` holds), else
    ``make()`` (which does the work and returns :func:`write_done`'s dict). ``force`` redoes it regardless."""
    done = read_done(folder)
    if not force and done is not None and done["fingerprint"] == fp and (complete is None or complete(folder)):
        logger.info("grid: %s: done already (%s), skipped", what, done.get("finished_utc"))
        return done
    return make()
