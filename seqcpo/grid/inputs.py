"""What is at the paths a grid names: its local inputs' content, checked before any finished stage is skipped.

Stage fingerprints (:mod:`seqcpo.grid.cache`) hash the grid's settings, which name a data file or a model folder
by its path; they are frozen, so that a refactor does not invalidate finished arms. The content at those paths is
recorded beside them instead: ``out_dir/inputs.json`` maps every local data file or folder and model folder an arm
uses to the sha256 of its content (embedded names are pinned by the installed asset packages and Hub ids by the
Hub: not hashed). A run whose inputs changed since stages were finished from them is refused before anything
runs, naming the input: results made from old and from new content are never mixed in one report.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from seqcpo.grid.spec import GridConfig, GridError
from seqcpo.io import atomic_write_json

INPUTS_FILE = "inputs.json"


def local_inputs(grid: GridConfig) -> dict[str, str]:
    """``{"dataset PATH": digest, "model_name_or_path PATH": digest}`` for every local input of every arm."""
    from seqcpo.models import model_digest, source_digest

    found: dict[str, str] = {}
    for arm in grid.arms:
        data, model = str(arm.config.dataset), str(arm.config.model_name_or_path)
        if f"dataset {data}" not in found and os.path.exists(os.path.expanduser(data)):
            found[f"dataset {data}"] = source_digest(os.path.expanduser(data))
        if f"model_name_or_path {model}" not in found and os.path.isdir(os.path.expanduser(model)):
            digest = model_digest(os.path.expanduser(model))
            if digest:
                found[f"model_name_or_path {model}"] = digest
    return found


def _recorded(path: Path) -> dict[str, str] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def check_inputs(grid: GridConfig, write: bool = True) -> None:
    """Refuse (one-line :class:`GridError`) when a local input changed since the grid's finished stages were made
    from it; else record the inputs' content (``write``) for the next run. Before any stage has finished there is
    nothing to mix, so the record is simply renewed."""
    now = local_inputs(grid)
    path = grid.out_dir / INPUTS_FILE
    recorded = _recorded(path)
    finished = grid.out_dir.is_dir() and next(grid.out_dir.rglob("done.json"), None) is not None
    if recorded is not None and finished:
        for key, digest in now.items():
            if key in recorded and recorded[key] != digest:
                name, value = key.split(" ", 1)
                raise GridError(
                    f"{grid.path}: {name} {value} changed since this grid's finished stages were made from it "
                    f"(content sha256 {recorded[key][:12]}... then, {digest[:12]}... now): their results would mix "
                    f"with the new content's. Restore it, or delete {grid.out_dir} (or set another out_dir) to redo "
                    "every stage"
                )
    merged = {**(recorded or {}), **now} if finished else now
    if write and merged != recorded and (merged or recorded is not None):
        grid.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, merged)
