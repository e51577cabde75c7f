"""Completeness: a checkpoint is complete only when its marker says so and every file still holds what was written.

The marker :data:`COMPLETE_MARKER` is written last, atomically, after every other file is flushed to disk. It lists
every file with its size and sha256. :func:`read_marker` checks presence and sizes (cheap: used by listing and
rotation); :func:`verify_checksums` re-reads every file and compares its sha256 (used once, on the checkpoint a run
resumes from), so a file corrupted in place at the same size makes the checkpoint torn.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

from seqcpo.io import atomic_write_json
from seqcpo.models.digest import sha256_file
from seqcpo.training.checkpoints.identity import identity_key

logger = logging.getLogger("seqcpo")

COMPLETE_MARKER = "seqcpo_complete.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# 1: files -> size; 2: files -> {"size", "sha256"}
_MARKER_VERSION = 2


def _checkpoint_files(folder: str) -> list[str]:
    out = []
    for root, _, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != COMPLETE_MARKER and not name.endswith(".tmp"):
                out.append(rel)
    return sorted(out)


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


def write_complete_marker(folder: str, step: int, identity: dict[str, Any], timing: dict | None = None) -> None:
    """Mark ``folder`` complete: every file flushed first, then the marker (each file's size and sha256, the run's
    identity, and ``timing``: ``seconds``, the run's time up to this step across resumes, and
    ``seconds_untimed_before_step`` when the steps before it were never timed) written atomically."""
    _fsync_tree(folder)
    files = {}
    for rel in _checkpoint_files(folder):
        full = os.path.join(folder, rel)
        files[rel] = {"size": os.path.getsize(full), "sha256": sha256_file(full)}
    atomic_write_json(
        os.path.join(folder, COMPLETE_MARKER),
        {"version": _MARKER_VERSION, "step": int(step), "files": files,
         "identity_key": identity_key(identity), "identity": identity,
         **{k: v for k, v in (timing or {}).items() if v is not None}},
    )
    _fsync_dir(folder)


def _size_of(entry: Any) -> Any:
    return entry.get("size") if isinstance(entry, dict) else entry


def read_marker(folder: str) -> dict[str, Any] | None:
    """The marker of a complete checkpoint, or None when ``folder`` is torn (no marker, or a listed file is missing
    or has another size). Contents are not re-read here: see :func:`verify_checksums`."""
    try:
        with open(os.path.join(folder, COMPLETE_MARKER), encoding="utf-8") as fh:
            marker = json.load(fh)
    except (OSError, ValueError):
        return None
    files = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(files, dict) or not files:
        return None
    for rel, entry in files.items():
        full = os.path.join(folder, rel)
        if not os.path.isfile(full) or os.path.getsize(full) != _size_of(entry):
            return None
    return marker


def verify_checksums(folder: str, marker: dict[str, Any]) -> str | None:
    """None when every file of ``folder`` still has the sha256 its marker recorded; else the first file that does
    not (a marker of version 1 recorded sizes only: nothing more to check)."""
    for rel, entry in sorted(marker.get("files", {}).items()):
        want = entry.get("sha256") if isinstance(entry, dict) else None
        if want is None:
            continue
        try:
            got = sha256_file(os.path.join(folder, rel))
        except OSError:
            return rel
        if got != want:
            return rel
    return None


def checkpoint_bytes(marker: dict[str, Any]) -> int:
    """The total size of the files a complete checkpoint's marker lists."""
    return sum(int(_size_of(e) or 0) for e in marker.get("files", {}).values())


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
    """(the complete checkpoint with the highest step or None, the torn checkpoints newer than it); sizes only."""
    torn = []
    for _, path in reversed(list_checkpoints(run_dir)):
        if read_marker(path) is not None:
            return path, torn
        torn.append(path)
    return None, torn
