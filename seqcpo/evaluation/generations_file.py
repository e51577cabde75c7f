"""The generations file (JSONL, one row per model x decoding x example): reading it (a torn last line from a crash
is skipped and cut off), appending rows, and moving aside rows that another checkpoint or other inputs made."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

from seqcpo.io import atomic_write_jsonl

logger = logging.getLogger(__name__)


def _row_key(row: dict) -> tuple[str, str, str]:
    return (str(row["id"]), str(row["model"]), str(row["decoding"]))


def read_generations(path: str | os.PathLike, repair: bool = False) -> list[dict]:
    """Read a generations JSONL file. A torn last line (crash mid-write) is skipped, and cut off the file
    when ``repair``; an unreadable line elsewhere is skipped with a warning."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    rows: list[dict] = []
    good_end = 0  # byte offset just past the last complete, parseable line
    offset = 0
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        is_last = i == len(lines) - 1
        end = offset + len(line) + (0 if is_last else 1)
        if line.strip():
            try:
                row = json.loads(line)
                if not (isinstance(row, dict) and all(k in row for k in ("id", "model", "decoding"))):
                    raise ValueError("not a generation row")
                rows.append(row)
                if not is_last:
                    good_end = end
            except ValueError:  # json.JSONDecodeError is one
                if is_last:
                    logger.warning("%s: dropping a torn last line (%d bytes)", path, len(line))
                else:
                    logger.warning("%s: skipping unreadable line %d", path, i + 1)
                    good_end = end
        elif not is_last:
            good_end = end
        offset = end
    if repair:
        tail = data[good_end:]
        if tail.strip():
            try:
                json.loads(tail)
                # complete last row without its newline: finish the line rather than drop the row
                with open(path, "ab") as f:
                    f.write(b"\n")
            except json.JSONDecodeError:
                with open(path, "r+b") as f:
                    f.truncate(good_end)
        elif tail:
            with open(path, "r+b") as f:
                f.truncate(good_end)
    return rows


def _append_rows(path: Path, rows: Iterable[dict]) -> None:
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    with open(path, "ab") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())


def _move_stale(out_path: Path, stale: set[tuple[str, str, str]], why: str) -> None:
    """Move the rows keyed in ``stale`` from ``out_path`` to ``<stem>.stale.jsonl`` (kept, never mixed)."""
    rows = read_generations(out_path)
    keep = [r for r in rows if _row_key(r) not in stale]
    moved = [r for r in rows if _row_key(r) in stale]
    side = out_path.with_name(out_path.stem + ".stale.jsonl")
    _append_rows(side, moved)  # first, so a crash between the two writes loses nothing
    atomic_write_jsonl(out_path, keep)
    logger.warning("%s: %d row(s) were made from %s; moved them to %s and generating them again", out_path,
                   len(moved), why, side)


def _stale_rows(done: dict, configs, ids, inputs, label: str, ckpt: str, out_path: Path):
    """(keys of rows made from another checkpoint or other inputs, why); ValueError for rows made with other
    settings under the same decoding name (a resumed file must have been made with the same settings)."""
    stale: set[tuple[str, str, str]] = set()
    reasons = set()
    for c in configs:
        wanted = asdict(c)
        for i in range(len(ids)):
            key = (ids[i], label, c.name)
            old = done.get(key)
            if old is None:
                continue
            if old.get("config", wanted) != wanted:
                raise ValueError(
                    f"{out_path} already holds {label!r} / {c.name!r} rows made with {old['config']}, not {wanted}; "
                    "write to a new file (--out) or give this run another decoding name or model label"
                )
            if old.get("checkpoint") != ckpt:
                stale.add(key)
                reasons.add(f"another checkpoint ({old.get('model_path')}, {old.get('checkpoint') or 'unrecorded'})")
            elif old.get("inputs_sha256") != inputs[i]:
                stale.add(key)
                reasons.add("other inputs (another data file, split, template or length limit)")
    return stale, reasons
