"""Loading causal LMs and tokenizers by name, folder or Hub id (safetensors only); optional LoRA."""

from __future__ import annotations

import logging
import os
from typing import Any, Optional, Sequence, Union

import torch

from seqcpo.models.files import _convert_once, cache_dir, check_safetensors
from seqcpo.models.gguf import EMBEDDED_MODELS, _convert_embedded
from seqcpo.models.pickled import _bin_only, _hub_bin_snapshot, converted_bin_checkpoint
from seqcpo.models.tokenizers import _sentencepiece_advised, _sentencepiece_tokenizer

logger = logging.getLogger("seqcpo.models")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def load_model_config(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """``AutoConfig`` of a model name/path/id (the model's shape, no weights), with :func:`load_model`'s errors."""
    from transformers import AutoConfig

    path = _checked_path(name_or_path)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        if os.path.isdir(path):
            raise
        raise _not_found(name_or_path, e) from None


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
        check_safetensors(path)  # a cut-short file: one line naming it, not safetensors' error from deep inside
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


class ModelNotFoundError(OSError):
    """A model name that is neither a local folder nor loadable from the Hub; one line naming it."""


def _not_found(name: str, err: Exception) -> OSError:
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return ModelNotFoundError(
        f"could not load {name!r}: not a local folder and not loadable as a Hugging Face Hub id (offline, private "
        f"or misspelt?): {first}"
    )

