"""Pickled ``.bin`` checkpoints: read with ``torch.load(weights_only=True)`` (which refuses any pickle that is more
than tensors and containers) and converted once to a safetensors copy under ``$SEQCPO_CACHE/models/bin-<name>-<key>``;
the key covers the source (real path, or Hub repo id and commit) and every weight file's name, size and
modification time (Hub: its content-addressed blob name)."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Optional

import torch

from seqcpo.models.files import _convert_once, _is_checkpoint, cache_dir

logger = logging.getLogger("seqcpo.models")

BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
CONVERTED_FILE = "seqcpo_converted.json"
# files never copied into a converted folder: other weight formats and pickles
_SKIP_SUFFIXES = (".bin", ".bin.index.json", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".h5", ".msgpack",
                  ".safetensors", ".safetensors.index.json", ".lock")


class UnsafeCheckpointError(ValueError):
    """A ``.bin`` file that ``torch.load(weights_only=True)`` refuses (code, or objects other than tensors)."""


def _bin_only(folder: str) -> bool:
    """A model folder whose weights are pickled ``.bin`` only (no safetensors)."""
    try:
        files = os.listdir(folder)
    except OSError:
        return False
    if any(f.endswith((".safetensors", ".safetensors.index.json")) for f in files):
        return False
    return BIN_WEIGHTS in files or BIN_INDEX in files


def _bin_files(folder: str) -> list[str]:
    """The weight files of a .bin checkpoint: the index's shards, or ``pytorch_model.bin``."""
    index = os.path.join(folder, BIN_INDEX)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as fh:
                weight_map = json.load(fh)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a readable weight index ({e})") from None
        files = sorted(set(weight_map.values()))
        for f in files:
            if os.path.basename(f) != f or not os.path.isfile(os.path.join(folder, f)):
                raise FileNotFoundError(f"{index} names {f!r}, which is not a file in {folder}")
        return files
    return [BIN_WEIGHTS]


def _file_identity(folder: str, name: str) -> list:
    path = os.path.join(folder, name)
    link = os.readlink(path) if os.path.islink(path) else None  # a Hub cache blob is named by its sha256
    st = os.stat(path)
    return [name, st.st_size, os.path.basename(link) if link else st.st_mtime_ns]


def converted_bin_checkpoint(folder: str, source: Optional[str] = None) -> str:
    """The safetensors copy of the ``.bin``-only checkpoint ``folder``, converted on first use; its path.

    ``source`` names where the folder came from (a Hub ``repo@commit``); default the folder's real path.
    Concurrent callers wait on one lock; a killed conversion leaves only a temp folder, removed next time.
    Raises :class:`UnsafeCheckpointError` naming the file when a pickle holds anything but tensors.
    """
    folder = os.path.abspath(folder)
    files = _bin_files(folder)
    source = source or os.path.realpath(folder)
    ident = {"source": source, "files": [_file_identity(folder, f) for f in files],
             "config": _file_identity(folder, "config.json") if os.path.exists(os.path.join(folder, "config.json")) else None}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    label = "".join(c if c.isalnum() or c in "-_." else "-" for c in os.path.basename(source.split("@")[0].rstrip("/")))
    target = os.path.join(cache_dir(), "models", f"bin-{label or 'model'}-{key}")
    return _convert_once(target, lambda: _convert_bin(folder, files, target, ident))


def _convert_bin(folder: str, files: list[str], target: str, ident: dict) -> None:
    from safetensors.torch import save_file

    logger.info("converting pickled weights of %s to safetensors (once; cached in %s)", folder, target)
    start = time.time()
    tmp = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=f".{os.path.basename(target)}.tmp-")
    try:
        weight_map: dict[str, str] = {}
        total = 0
        for name in files:
            state = load_bin_state_dict(os.path.join(folder, name))
            out_name = "model.safetensors" if len(files) == 1 else name.replace("pytorch_model", "model").replace(".bin", ".safetensors")
            tensors = _unshared(state)
            save_file(tensors, os.path.join(tmp, out_name), metadata={"format": "pt"})
            for k, t in tensors.items():
                weight_map[k] = out_name
                total += t.numel() * t.element_size()
            del state, tensors
        if len(files) > 1:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as fh:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
        for entry in os.listdir(folder):  # config, generation config, tokenizer files
            src = os.path.join(folder, entry)
            if os.path.isfile(src) and not entry.startswith(".") and not entry.endswith(_SKIP_SUFFIXES):
                shutil.copyfile(src, os.path.join(tmp, entry))
        with open(os.path.join(tmp, CONVERTED_FILE), "w", encoding="utf-8") as fh:
            json.dump(dict(ident, torch=torch.__version__), fh, indent=2)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_checkpoint(target):
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s in %.1f s", folder, time.time() - start)


def load_bin_state_dict(path: str) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` from a pickled ``.bin`` through ``torch.load(weights_only=True)``, which refuses code."""
    import pickle

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # the legacy (non-zip) format cannot be memory-mapped: read it whole
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpointError(
            f"{path}: refused: torch.load(weights_only=True) cannot read it as plain tensors ({first}). A pickle "
            "can run code when loaded; seqcpo loads only tensors. Convert it yourself where you trust its "
            "origin, or use a safetensors checkpoint"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UnsafeCheckpointError(f"{path}: not a flat state dict of named tensors; cannot convert it")
    return state


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors with no storage shared (safetensors refuses tied views; transformers re-ties them)."""
    seen: set[int] = set()
    out = {}
    for k, t in state.items():
        ptr = t.untyped_storage().data_ptr()
        whole = t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        out[k] = t if ptr not in seen and whole else t.contiguous().clone()
        seen.add(ptr)
    return out


@functools.lru_cache(maxsize=32)
def _hub_bin_snapshot(repo_id: str) -> Optional[tuple[str, str]]:
    """``(local snapshot folder, "repo@commit")`` when Hub repo ``repo_id`` ships only .bin weights, else None.

    Online, the repo's file list decides and only the files a model needs are downloaded; offline, a cached
    snapshot is used if one exists. Any Hub error returns None: transformers then reports it.
    """
    try:
        from huggingface_hub import model_info, snapshot_download
    except ImportError:
        return None
    patterns = ["*.json", "*.bin", "*.model", "*.txt", "*.py", "*.tiktoken"]
    try:
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
            folder = snapshot_download(repo_id, local_files_only=True)
        else:
            info = model_info(repo_id)
            names = [s.rfilename for s in (info.siblings or [])]
            if any(n.endswith(".safetensors") for n in names) or not any(n.startswith("pytorch_model") and n.endswith(".bin") for n in names):
                return None
            folder = snapshot_download(repo_id, revision=info.sha, allow_patterns=patterns)
    except Exception:  # offline, private, misspelt: transformers gives the user its own message
        return None
    if not _bin_only(folder):
        return None
    return folder, f"{repo_id}@{os.path.basename(os.path.normpath(folder))}"

