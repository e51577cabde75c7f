"""Model files on disk: the seqcpo cache folder, a checkpoint folder's side files, a check that its safetensors
files are whole, and converting a model once under a lock (the embedded GGUF, pickled ``.bin`` weights) so
concurrent processes never see half a folder."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from typing import Iterator, Optional

# Everything in a checkpoint folder besides the weights that decides what it generates: config and tokenizer.
CHECKPOINT_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)


class DamagedWeightsError(ValueError):
    """A safetensors weights file that cannot be read (truncated, header zeroed); the message names the file."""


def check_safetensors(folder: str | os.PathLike) -> None:
    """Raise :class:`DamagedWeightsError` naming the first ``*.safetensors`` file in ``folder`` whose header does
    not read or does not cover the file (a copy cut short, a zeroed header). Reads the headers only."""
    from safetensors import SafetensorError, safe_open

    for name in sorted(os.listdir(folder)):
        if not name.endswith(".safetensors"):
            continue
        try:
            with safe_open(os.path.join(folder, name), framework="pt"):
                pass
        except SafetensorError as e:  # not a ValueError/OSError: it would escape as a traceback
            raise DamagedWeightsError(
                f"checkpoint {folder}: {name} is truncated or damaged ({e}); copy or save it again"
            ) from None


def cache_dir() -> str:
    """``$SEQCPO_CACHE`` or ``~/.cache/seqcpo``: converted models live in its ``models/`` folder."""
    return os.path.expanduser(os.environ.get("SEQCPO_CACHE") or os.path.join("~", ".cache", "seqcpo"))


def _convert_once(target: str, convert) -> str:
    """``target`` once ``convert()`` has written it, by this process or another: concurrent callers wait on one
    lock, and the temp folder of a killed conversion is removed by the next."""
    if _is_checkpoint(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with _conversion_lock(target) as locked:
        if _is_checkpoint(target):  # another process converted it while we waited
            return target
        if locked:
            _remove_stale_temps(target)
        convert()
    return target



@contextmanager
def _conversion_lock(target: str) -> Iterator[bool]:
    """An exclusive lock file next to ``target`` (POSIX); yields whether the lock is held."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; a concurrent conversion loses the rename and is discarded
        yield False
        return
    with open(target + ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale_temps(target: str) -> None:
    """Temp folders left by a killed conversion (safe to remove while we hold the lock)."""
    folder, key = os.path.split(target)
    for entry in os.listdir(folder):
        if entry.startswith(f".{key}.tmp-"):
            shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)


def _is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        f.endswith(".safetensors") for f in os.listdir(path)
    )


def _version(distribution: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None

