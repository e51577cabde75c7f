"""Weight-space ensembles of two checkpoints (docs/method.md, "Weight-space ensembles"; WiSE-FT, Wortsman et al. 2022).

For each alpha::

    theta_alpha = (1 - alpha) * theta_A + alpha * theta_B

with A the MLE model and B the CPO model by default (both trained from the same start, so their weights
live in one basin and the average is a good model). Each result is an ordinary Hugging Face checkpoint
folder, ``out_dir/alpha-0.25/``, that plain ``AutoModelForCausalLM.from_pretrained`` loads:

- weights in safetensors with A's file layout (A's shards and index when A is sharded), one shard in memory
  at a time; computed in float32 and saved in A's dtype (tensor by tensor); alpha 0 and 1 copy the endpoint
  tensors bit for bit;
- ``config.json``, ``generation_config.json`` and the tokenizer files copied from A;
- ``seqcpo_ensemble.json``: ``{"alpha", "from", "to", "formula", ...}`` (the evaluation package reads
  ``alpha`` from it for its alpha-sweep plot), and a short ``README.md`` model card.

Each alpha is written into a temporary folder beside its target (``.alpha-0.25.XXXXXXXX.tmp``) and renamed
into place with the mode a plain ``mkdir`` gives, so a crash never leaves a half-written ``alpha-*`` folder; the
temp folders of a run killed outright (SIGKILL, power loss) are removed by the next run into the same folder (one
run writes into an output folder at a time). Alphas outside [0, 1] extrapolate and are allowed.

Two checkpoints are refused unless they share model_type, parameter names and shapes, and the tokenizer (its
vocabulary and special-token ids, when both folders hold one): the result carries A's tokenizer.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from seqcpo.io import _UMASK, atomic_write_json, atomic_write_text
from seqcpo.models import CHECKPOINT_SIDE_FILES, check_safetensors

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ENSEMBLE_FILE = "seqcpo_ensemble.json"
# Files copied from A besides the weights: the config and everything a tokenizer may need.
COPIED_FILES = CHECKPOINT_SIDE_FILES
# Config keys that may differ between two checkpoints of one architecture without harm.
_BENIGN_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache", "architectures"}
# Files that make a tokenizer: a folder with none of them has no tokenizer to compare.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")
# Our temp folders, tempfile.mkdtemp(prefix=".alpha-0.5." or ".alpha-0.5.old.", suffix=".tmp"): 8 random characters.
_TEMP_NAME = re.compile(r"\.alpha-.+\.[a-z0-9_]{8}\.tmp")


class EnsembleError(ValueError):
    """Two checkpoints that cannot be interpolated; the message says what differs."""


def alpha_dir_name(alpha: float) -> str:
    """``alpha-0.25``, ``alpha-0``, ``alpha-1``."""
    return f"alpha-{alpha:g}"


def weight_files(path: str | os.PathLike) -> dict[str, str]:
    """Parameter name -> the safetensors file (relative to ``path``) that holds it."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return dict(weight_map)
    single = path / SINGLE_FILE
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {k: SINGLE_FILE for k in f.keys()}
    raise EnsembleError(
        f"{path}: no {SINGLE_FILE} or {INDEX_FILE}; weight-space ensembles need safetensors checkpoints "
        "(a folder written by `seqcpo train` or save_pretrained(safe_serialization=True))"
    )


def _shapes(path: Path, files: dict[str, str]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Parameter name -> (shape, dtype name), read from the safetensors headers only."""
    from safetensors import safe_open

    out = {}
    for fname in sorted(set(files.values())):
        with safe_open(str(path / fname), framework="pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = (tuple(sl.get_shape()), str(sl.get_dtype()))
    return out


def _read_config(path: Path) -> dict:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise EnsembleError(f"{path}: no config.json; is this a Hugging Face checkpoint folder?")
    return json.loads(cfg.read_text(encoding="utf-8"))


def check_compatible(path_a: str | os.PathLike, path_b: str | os.PathLike) -> None:
    """Raise :class:`EnsembleError` naming what differs: model_type, parameter names or shapes, tokenizer."""
    a, b = Path(path_a), Path(path_b)
    cfg_a, cfg_b = _read_config(a), _read_config(b)
    if cfg_a.get("model_type") != cfg_b.get("model_type"):
        raise EnsembleError(
            f"model_type differs: {a} is {cfg_a.get('model_type')!r}, {b} is {cfg_b.get('model_type')!r}; "
            "a weight-space ensemble needs two checkpoints of one architecture (ideally fine-tuned from one start)"
        )
    shapes_a, shapes_b = _shapes(a, weight_files(a)), _shapes(b, weight_files(b))
    only_a, only_b = sorted(set(shapes_a) - set(shapes_b)), sorted(set(shapes_b) - set(shapes_a))
    if only_a or only_b:
        parts = []
        if only_a:
            parts.append(f"{len(only_a)} only in {a} (first: {', '.join(only_a[:3])})")
        if only_b:
            parts.append(f"{len(only_b)} only in {b} (first: {', '.join(only_b[:3])})")
        raise EnsembleError("parameter names differ: " + "; ".join(parts))
    bad = [k for k in sorted(shapes_a) if shapes_a[k][0] != shapes_b[k][0]]
    if bad:
        k = bad[0]
        raise EnsembleError(
            f"parameter shapes differ for {len(bad)} tensors, first {k}: {list(shapes_a[k][0])} in {a} vs "
            f"{list(shapes_b[k][0])} in {b}"
        )
    other = sorted(
        k for k in set(cfg_a) | set(cfg_b) if k not in _BENIGN_CONFIG_KEYS and cfg_a.get(k) != cfg_b.get(k)
    )
    check_same_tokenizer(a, b)
    if other:  # same tensors, other settings (say rope_theta): the result takes A's config
        logger.warning("config keys differ between %s and %s: %s; the ensembles use A's config", a, b, ", ".join(other))


def _tokenizer(path: Path):
    """The folder's tokenizer (read from its files, offline), or None when it holds no tokenizer files."""
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from seqcpo.models import load_tokenizer

    try:
        return load_tokenizer(str(path))
    except (OSError, ValueError, ImportError) as e:
        raise EnsembleError(f"{path}: its tokenizer cannot be loaded ({type(e).__name__}: {e})") from None


def _vocab_difference(va: dict[str, int], vb: dict[str, int]) -> str | None:
    """How two vocabularies (token -> id) differ, by their first differing id; None when they are equal."""
    if va == vb:
        return None
    ia, ib = {i: t for t, i in va.items()}, {i: t for t, i in vb.items()}
    first = min(i for i in set(ia) | set(ib) if ia.get(i) != ib.get(i))
    sizes = f"sizes {len(va)} vs {len(vb)}, " if len(va) != len(vb) else ""
    return f"vocabularies differ ({sizes}first at id {first}: {ia.get(first)!r} in A, {ib.get(first)!r} in B)"


def _special_ids(tok) -> dict[str, object]:
    """The special-token ids training and generation rely on, by role."""
    roles = ("bos", "eos", "pad", "unk")
    ids: dict[str, object] = {f"{r}_token_id": getattr(tok, f"{r}_token_id", None) for r in roles}
    ids["all_special_ids"] = sorted(tok.all_special_ids)
    return ids


def check_same_tokenizer(a: Path, b: Path) -> None:
    """Raise :class:`EnsembleError` when the two folders' tokenizers differ in vocabulary or special-token ids:
    a weight-space average of embeddings over two vocabularies mixes unrelated tokens (the result keeps A's)."""
    tok_a, tok_b = _tokenizer(a), _tokenizer(b)
    if tok_a is None or tok_b is None:
        if tok_a is not None or tok_b is not None:  # one folder has none: nothing to compare it with
            missing = a if tok_a is None else b
            logger.warning("%s has no tokenizer files: cannot check that %s and %s share a tokenizer", missing, a, b)
        return
    why = _vocab_difference(tok_a.get_vocab(), tok_b.get_vocab())
    if why is None:
        sa, sb = _special_ids(tok_a), _special_ids(tok_b)
        diff = [k for k in sa if sa[k] != sb[k]]
        if diff:
            k = diff[0]
            why = f"special tokens differ ({k} is {sa[k]} in A, {sb[k]} in B)"
    if why:
        raise EnsembleError(
            f"tokenizers differ between A {a} and B {b}: {why}; a weight-space ensemble needs two checkpoints "
            "with one tokenizer (the result would carry A's)"
        )


def _interpolate_tensor(ta: torch.Tensor, tb: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - alpha) * ta + alpha * tb in float32, returned in ta's dtype; endpoints copied exactly."""
    if alpha == 0.0:
        return ta.clone()
    if alpha == 1.0:
        return tb.to(ta.dtype).clone()
    if not (ta.is_floating_point() and tb.is_floating_point()):
        if not torch.equal(ta, tb.to(ta.dtype)):
            raise EnsembleError("an integer tensor differs between the two checkpoints; it cannot be interpolated")
        return ta.clone()
    mixed = ((1.0 - alpha) * ta.float() + alpha * tb.float()).to(ta.dtype)
    if not torch.isfinite(mixed).all() and torch.isfinite(ta).all() and torch.isfinite(tb).all():
        raise EnsembleError(f"alpha {alpha:g} takes the weights past what {str(ta.dtype).replace('torch.', '')} holds "
                            "(infinite values): choose an alpha nearer [0, 1]")
    return mixed


def _model_card(alpha: float, a: str, b: str) -> str:
    return "\n".join([
        "---",
        "library_name: transformers",
        "tags: [seqcpo, weight-space-ensemble, wise-ft]",
        "---",
        "",
        f"# Weight-space ensemble, alpha = {alpha:g}",
        "",
        f"`theta = (1 - {alpha:g}) * theta_A + {alpha:g} * theta_B`, made by `seqcpo ensemble` (WiSE-FT style, "
        "docs/method.md \"Weight-space ensembles\"), computed in float32 and saved in A's dtype.",
        "",
        f"- A (alpha = 0): `{a}`",
        f"- B (alpha = 1): `{b}`",
        "",
        "Config and tokenizer are A's. Details in `seqcpo_ensemble.json`. Load with plain transformers:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        'model = AutoModelForCausalLM.from_pretrained("<this folder>")',
        "```",
        "",
    ])


def _write_one(a: Path, b: Path, files_a: dict[str, str], files_b: dict[str, str], alpha: float, target: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    import seqcpo

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        handles_b: dict[str, object] = {}
        for shard in sorted(set(files_a.values())):  # A's layout: one output shard per input shard
            out = {}
            with safe_open(str(a / shard), framework="pt") as fa:
                for name in fa.keys():
                    fname_b = files_b[name]
                    if fname_b not in handles_b:
                        handles_b[fname_b] = safe_open(str(b / fname_b), framework="pt")
                    out[name] = _interpolate_tensor(fa.get_tensor(name), handles_b[fname_b].get_tensor(name), alpha)
            save_file(out, str(tmp / shard), metadata={"format": "pt"})
            del out
        handles_b.clear()
        for fname in COPIED_FILES:
            if (a / fname).is_file():
                shutil.copy2(a / fname, tmp / fname)
        if (a / INDEX_FILE).is_file():
            shutil.copy2(a / INDEX_FILE, tmp / INDEX_FILE)  # same names, shards and dtypes as A
        atomic_write_json(tmp / ENSEMBLE_FILE, {
            "alpha": alpha,
            "from": str(a),
            "to": str(b),
            "formula": "theta = (1 - alpha) * theta_from + alpha * theta_to (float32, saved in from's dtype)",
            "seqcpo_version": seqcpo.__version__,
        })
        atomic_write_text(tmp / "README.md", _model_card(alpha, str(a), str(b)))
        old = None
        if target.exists():  # move the old folder aside first: a rename cannot replace a non-empty folder
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", suffix=".tmp", dir=target.parent))
            os.replace(target, old / target.name)
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes it owner-only; the result gets the mode a mkdir would give
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:  # also KeyboardInterrupt, and SIGTERM where the CLI turns it into an exception
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_stale_temps(out_dir: Path) -> None:
    """Our temp folders left in ``out_dir`` by a run killed before it could clean up (SIGKILL, power loss)."""
    if not out_dir.is_dir():
        return
    for entry in out_dir.iterdir():
        if _TEMP_NAME.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            logger.warning("removing %s, left by an interrupted ensemble run", entry)
            shutil.rmtree(entry, ignore_errors=True)


def interpolate_checkpoints(
    path_a: str | os.PathLike,
    path_b: str | os.PathLike,
    alphas: Sequence[float],
    out_dir: str | os.PathLike,
) -> list[str]:
    """Write ``(1 - alpha) * A + alpha * B`` for each alpha to ``out_dir/alpha-{alpha:g}/``; returns the folders.

    Args:
        path_a: checkpoint A (alpha = 0), a local safetensors folder or an embedded model name.
        path_b: checkpoint B (alpha = 1), same architecture and parameter names/shapes as A.
        alphas: the mixing weights (distinct; values outside [0, 1] extrapolate).
        out_dir: parent folder of the ``alpha-*`` checkpoints (an existing ``alpha-*`` is replaced, and the temp
            folders of an earlier run killed mid-write are removed).

    Raises:
        EnsembleError: a missing checkpoint, or two that differ in model_type, parameter names or shapes, or
            tokenizer.
        DamagedWeightsError: a truncated or damaged safetensors file (named).
    """
    from seqcpo.models import resolve_model_path

    alphas = [float(x) for x in alphas]
    if not alphas:
        raise EnsembleError("give at least one alpha")
    if any(not math.isfinite(x) for x in alphas):
        raise EnsembleError(f"alphas must be finite numbers, got {alphas}")
    names = [alpha_dir_name(x) for x in alphas]
    if len(set(names)) != len(names):
        raise EnsembleError(f"alphas must be distinct, got {alphas}")
    a, b = (Path(resolve_model_path(str(p))) for p in (path_a, path_b))
    for p, which in ((a, "A (--from)"), (b, "B (--to)")):
        if not p.is_dir():
            raise EnsembleError(f"checkpoint {which} {p}: no such folder (a Hub id must be downloaded first)")
    a, b = a.resolve(), b.resolve()
    for p in (a, b):
        check_safetensors(p)
    check_compatible(a, b)
    files_a, files_b = weight_files(a), weight_files(b)
    _remove_stale_temps(Path(out_dir))
    out = []
    for alpha, name in zip(alphas, names):
        target = Path(out_dir) / name
        logger.info("ensemble alpha=%g -> %s", alpha, target)
        _write_one(a, b, files_a, files_b, alpha, target)
        out.append(str(target))
    return out
