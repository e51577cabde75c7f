"""Content digests: what decides reuse is a file's bytes, not its path.

:func:`file_digest` is the sha256 of a whole file, computed once and cached (in memory and under
``$SEQCPO_CACHE/digests``) by the file's real path, size, modification time, inode and status-change time
(``st_ctime_ns``, which no user tool can set back: an edit that restores the modification time still changes
it), so a file is re-read only after it changed. :func:`model_digest` combines the digests of a model folder's
weights, config and tokenizer files. :func:`sha256_file` is the uncached hash (a checkpoint is verified with it
before a resume). Measured cost: BENCHMARKS.md, "Content digests".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Optional

from seqcpo.io import atomic_write_json
from seqcpo.models.files import CHECKPOINT_SIDE_FILES, cache_dir

logger = logging.getLogger("seqcpo.models")

CHUNK = 8 << 20  # bytes read at a time
_MEMO: dict[tuple, str] = {}
# files of a model folder that decide what the model computes, besides CHECKPOINT_SIDE_FILES
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")
_NOT_WEIGHTS = ("training_args.bin",)


def sha256_file(path: str) -> str:
    """The sha256 of the whole file at ``path`` (read in 8 MiB chunks; never cached)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(CHUNK)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _stat_key(path: str) -> tuple:
    real = os.path.realpath(path)
    st = os.stat(real)
    return (real, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _cache_file(key: tuple) -> str:
    name = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]
    return os.path.join(cache_dir(), "digests", name[:2], name + ".json")


def file_digest(path: str) -> str:
    """sha256 of ``path``'s content, hashed once per (real path, size, mtime, inode, ctime) and cached."""
    key = _stat_key(path)
    if key in _MEMO:
        return _MEMO[key]
    cached = _cache_file(key)
    try:
        with open(cached, encoding="utf-8") as fh:
            entry = json.load(fh)
        if entry.get("key") == list(key) and isinstance(entry.get("sha256"), str):
            _MEMO[key] = entry["sha256"]
            return entry["sha256"]
    except (OSError, ValueError):
        pass
    digest = sha256_file(path)
    if _stat_key(path) == key:  # unchanged while it was read: safe to remember
        _MEMO[key] = digest
        _store(cached, {"key": list(key), "sha256": digest})
    return digest


def _store(path: str, entry: dict) -> None:
    """Best effort: a cache that cannot be written only costs a re-hash next time."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_json(path, entry)
    except OSError as e:
        logger.debug("digest cache not written (%s): %s", path, e)


def model_files(folder: str) -> list[str]:
    """The files of a model folder that decide what it computes: weights (safetensors, pickled ``.bin``, their
    indexes, LoRA adapters), config and tokenizer files; sorted names relative to ``folder``."""
    out = []
    for name in sorted(os.listdir(folder)):
        if not os.path.isfile(os.path.join(folder, name)) or name in _NOT_WEIGHTS:
            continue
        if name.endswith(WEIGHT_SUFFIXES) or name in CHECKPOINT_SIDE_FILES or name == "adapter_config.json":
            out.append(name)
    return out


def folder_digest(folder: str, names: list[str]) -> str:
    """sha256 over ``names`` (relative to ``folder``) and each file's :func:`file_digest`."""
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0" + file_digest(os.path.join(folder, name)).encode() + b"\n")
    return h.hexdigest()


def model_digest(name_or_path: str) -> Optional[str]:
    """The content digest (32 hex digits) of a model: its local folder's (or, for an embedded name, its converted
    folder's) weights, config and tokenizer files. None for a Hub id (its revision is the Hub's to pin)."""
    from seqcpo.models.gguf import EMBEDDED_MODELS
    from seqcpo.models.loading import resolve_model_path

    name = str(name_or_path)
    path = os.path.expanduser(name)
    if not os.path.isdir(path) and name.lower() in EMBEDDED_MODELS:
        path = resolve_model_path(name)
    if not os.path.isdir(path):
        return None
    names = model_files(path)
    return folder_digest(path, names)[:32] if names else None


def source_digest(path: str) -> str:
    """One file: its content digest. A folder: every file's relative name and content digest."""
    if os.path.isfile(path):
        return file_digest(path)
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode() + b"\0" + file_digest(full).encode())
    return h.hexdigest()
