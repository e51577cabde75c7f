"""Checkpoints as evaluation reads them: loading, the context length, and an identity for cache keys.

- :func:`load_checkpoint` / :func:`load_tokenizer_only`: a saved folder, an embedded name or a Hub id, through
  :mod:`seqcpo.models` (safetensors only), in eval mode on the requested device.
- :func:`checkpoint_identity`: a SHA-256 that changes when the model changes, so that generations written for
  one checkpoint are never reused for another that happens to carry the same label or path.
  It reads the small files that decide the model's behaviour in full (``config.json``,
  ``generation_config.json``, the tokenizer files, a LoRA ``adapter_config.json``) and, of each weight file,
  its name, size, safetensors header and 64 blocks of 4 KiB spread evenly over it (a file up to 1 MiB is read
  whole). Training changes nearly every byte of the weights, so a sample suffices and the cost stays at a
  few hundred KiB per file whatever the model's size. A Hub id that is not a local folder is identified by
  its name.
- :func:`context_length`: the most positions the model accepts (None when its config does not say).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from seqcpo.models import CHECKPOINT_SIDE_FILES

logger = logging.getLogger(__name__)

# Small files read in full: everything besides the weights that changes what a checkpoint generates.
IDENTITY_FILES = (*CHECKPOINT_SIDE_FILES, "adapter_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".gguf")
NOT_WEIGHTS = ("training_args.bin",)  # training state, not the model
_BLOCK = 4096
_BLOCKS = 64
_WHOLE_UP_TO = 1 << 20


def resolve_device(device: str | None = None) -> torch.device:
    """``None`` / ``"auto"``: CUDA when available, else CPU; anything else as ``torch.device`` reads it."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or loaded; the message is one line naming the path."""


def _one_line(path: str, err: Exception) -> CheckpointError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if first.startswith(f"{path}: "):  # the loader's message already starts with the path
        first = first[len(path) + 2:]
    return CheckpointError(f"checkpoint {path}: {first}")


def load_tokenizer_only(path: str):
    """The tokenizer of a checkpoint folder or name (pad token set to EOS when it has none)."""
    from seqcpo.models import load_tokenizer

    try:
        return load_tokenizer(path)
    except OSError as e:  # missing folder, no tokenizer files, a Hub id offline
        raise _one_line(path, e) from None


def load_checkpoint(path: str, dtype: str = "float32", device: str | None = None, tokenizer_path: str | None = None):
    """Load (model, tokenizer) from a checkpoint folder or name, in eval mode on ``device``.

    Raises :class:`CheckpointError` (a ``ValueError``) with a one-line message when it cannot be loaded."""
    from seqcpo.models import load_model

    try:
        model = load_model(path, dtype=dtype)
    except OSError as e:
        raise _one_line(path, e) from None
    tokenizer = load_tokenizer_only(tokenizer_path or path)
    model.to(resolve_device(device)).eval()
    return model, tokenizer


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad id, else its eos id, else 0 (padding is masked out, so any id serves)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def context_length(model_or_config) -> int | None:
    """The most positions a model accepts, from its config (``max_position_embeddings``, ``n_positions``,
    ``n_ctx``, ...); None when the config names none."""
    cfg = getattr(model_or_config, "config", model_or_config)
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _local_folder(name_or_path: str) -> Path | None:
    from seqcpo.models import resolve_model_path

    path = Path(os.path.expanduser(resolve_model_path(str(name_or_path))))
    return path if path.is_dir() else None


def _sample_file(h, path: Path) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as f:
        if size <= _WHOLE_UP_TO:
            h.update(f.read())
            return
        start = 0
        if path.name.endswith(".safetensors"):  # the header names every tensor, dtype, shape and offset
            head = f.read(8)
            n = int.from_bytes(head, "little")
            h.update(head + f.read(min(n, 100 << 20)))
            start = 8 + n
        span = max(size - start - _BLOCK, 0)
        for i in range(_BLOCKS):
            f.seek(start + span * i // (_BLOCKS - 1))
            h.update(f.read(_BLOCK))


def checkpoint_identity(name_or_path: str) -> str:
    """A content identity of a checkpoint: ``"sha256:<hex>"`` for a local folder, ``"name:<id>"`` for a Hub id.

    Two folders with the same files give the same identity wherever they lie (the path is not part of it);
    another training run, a changed config or tokenizer gives another. Raises :class:`CheckpointError` for a
    local-looking path that does not exist, a folder without weights, or a file it cannot read.
    """
    try:
        return _identity(name_or_path)
    except OSError as e:
        raise _one_line(str(name_or_path), e) from None


def _identity(name_or_path: str) -> str:
    folder = _local_folder(name_or_path)
    if folder is None:
        from seqcpo.models import _looks_local

        if os.path.isfile(os.path.expanduser(str(name_or_path))):
            raise FileNotFoundError("a file, not a checkpoint folder (with config.json and weights)")
        if _looks_local(str(name_or_path)):
            raise FileNotFoundError("no such checkpoint folder")
        return f"name:{name_or_path}"
    h = hashlib.sha256()
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    for name in names:
        if name in IDENTITY_FILES:
            h.update(f"{name}\0".encode())
            h.update((folder / name).read_bytes())
    weights = [n for n in names if n.endswith(WEIGHT_SUFFIXES) and n not in NOT_WEIGHTS]
    if not weights:
        raise FileNotFoundError("no weight files (.safetensors, .bin, .gguf), so not a checkpoint")
    for name in weights:
        _sample_file(h, folder / name)
    return "sha256:" + h.hexdigest()
