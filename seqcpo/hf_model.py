"""What the log-prob layouts read off, and switch on, a transformers causal LM.

Shared by every layout (:mod:`seqcpo.logps`, :mod:`seqcpo.two_pass`, :mod:`seqcpo.packing`) and by the
decoders (:mod:`seqcpo.negatives.autoregressive`): the model inside a DDP/FSDP wrapper, its attention
implementation (read, and switched for one call), its dtype, and the name of its KV-cache argument.
"""

from __future__ import annotations

import contextlib
import warnings

import torch


def unwrap_model(model):
    """The model inside DDP/FSDP-style wrappers (``.module``), for reading its config and LM head."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def attn_implementation(model) -> str:
    """The attention implementation the model runs now ("sdpa", "eager", "flex_attention", ...)."""
    cfg = getattr(unwrap_model(model), "config", None)
    return getattr(cfg, "_attn_implementation", None) or "eager"


def model_dtype(model) -> torch.dtype:
    """The dtype of the model's first parameter (the additive eager mask is built in it)."""
    return next(p for p in model.parameters()).dtype


def needs_grad(model) -> bool:
    """Whether a forward now builds an autograd graph through the model's parameters."""
    return torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())


def checkpointing_in_training(model) -> bool:
    """Whether activation (gradient) checkpointing will recompute the layers in backward: the model is in
    training mode with checkpointing on. A recomputed layer runs outside any context a forward set up."""
    inner = unwrap_model(model)
    on = getattr(inner, "is_activation_checkpointing", None)
    if on is None:  # transformers < 5.x name
        on = getattr(inner, "is_gradient_checkpointing", False)
    return bool(on) and inner.training


@contextlib.contextmanager
def use_attention(model, impl: str | None):
    """Run the model with ``config._attn_implementation = impl`` for the duration (None: leave it as it is).

    transformers' attention layers read the implementation off the (shared) config at every forward, so
    this switches the kernel for one call without reloading anything.
    """
    cfg = getattr(unwrap_model(model), "config", None)
    if impl is None or cfg is None or getattr(cfg, "_attn_implementation", None) == impl:
        yield
        return
    old = cfg._attn_implementation
    cfg._attn_implementation = impl
    try:
        yield
    finally:
        cfg._attn_implementation = old


def cache_kwarg(out) -> str:
    """Name of the KV-cache argument, read off a forward's output (so wrapped models with a bare
    ``forward(*args, **kwargs)`` work too): ``cache`` in transformers 5.x, ``past_key_values`` before."""
    return "cache" if hasattr(out, "cache") else "past_key_values"


def output_cache(out):
    """The KV cache a forward with ``use_cache=True`` returned."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def final_hidden(model, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """(R, L, H) final (post-norm) hidden states through the model's own forward.

    Going through ``model(...)`` rather than its backbone keeps DDP/FSDP/PEFT wrappers in the path;
    ``logits_to_keep=1`` makes the model's own LM head cost one position per row.
    """
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
    )
    return out.hidden_states[-1]


_warned: set[str] = set()


def warn_once(msg: str) -> None:
    """``warnings.warn`` the first time ``msg`` is seen in this process (a fallback taken at every step)."""
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, stacklevel=3)
