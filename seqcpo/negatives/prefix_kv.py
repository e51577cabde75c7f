"""One prefill for prefixes that are prefixes of each other (AN's shared-prefill backend, document anchors).

At the anchors of a document row every window's prefix is ``row[:a]``: all of them are prefixes of the longest
one. Attention is causal, so the keys/values of a sequence at positions ``< a`` and its hidden state at ``a - 1``
depend on its first ``a`` tokens only: prefilling the longest prefix (the "root") gives every shorter one its KV
cache (the root's first ``a`` positions) and its first next-token logits (the root's position ``a - 1``). Detected
from the token ids alone, so no caller has to say which prefixes share a row.

The per-prefix cache is laid out exactly as the unshared path's left-padded prefill lays it out (prefix right
aligned in a row as wide as the longest prefix, real tokens at positions 0..a-1), so decoding continues as if
each prefix had been prefilled in its own padded row.

Only a plain transformers ``DynamicCache`` whose layers are all plain ``DynamicLayer`` (keys/values of shape
(batch, heads, seq, head_dim) holding every position) is sliced: a sliding-window layer keeps only the last
window of the root (the shorter prefixes' windows are gone), quantized layers do not hold plain tensors, and
other cache classes carry state we do not know how to cut. For those :func:`sliceable_cache` says no and the
caller prefills every prefix on its own.
"""

from __future__ import annotations

from typing import Sequence

import torch


def prefix_roots(prefixes: Sequence[Sequence[int]]) -> list[int]:
    """``root[b]``: the index of a prefix of which prefix b is a prefix (itself when no other one contains it).

    Roots are the prefixes contained in no other prefix; of identical prefixes the first is the root. Longer
    prefixes are visited first, so a prefix contained in a non-root is matched against that one's root."""
    order = sorted(range(len(prefixes)), key=lambda b: -len(prefixes[b]))  # stable: first of equals first
    root = list(range(len(prefixes)))
    roots: list[int] = []
    for b in order:
        p = list(prefixes[b])
        match = next((r for r in roots if list(prefixes[r][: len(p)]) == p), None)
        if match is None:
            roots.append(b)
        else:
            root[b] = match
    return root


def sliceable_cache(cache) -> bool:
    """Whether ``cache`` is a plain ``DynamicCache`` of initialized plain ``DynamicLayer`` s (see the module doc)."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:  # transformers < 4.56: no per-layer cache objects
        return False
    if type(cache) is not DynamicCache or getattr(cache, "offloading", False) or not cache.layers:
        return False
    return all(
        type(layer) is DynamicLayer and layer.is_initialized and layer.keys is not None and layer.keys.dim() == 4
        for layer in cache.layers
    )


def slice_root_cache(cache, root_rows: torch.Tensor, root_offsets: torch.Tensor, lengths: torch.Tensor) -> None:
    """Turn the roots' cache (R rows, each root right-aligned in width W) into the prefixes' (B rows, width
    ``max(lengths)``, prefix b right-aligned), in place.

    Args:
        root_rows: (B,) the row of prefix b's root in the roots' cache.
        root_offsets: (B,) where that root's first real token sits (its left padding).
        lengths: (B,) prefix b's length.

    Positions left of a prefix are pad slots (masked by the caller's attention mask); they get a copy of the
    root's first token's KV, a finite value, as the pad tokens' KV are in the unshared path."""
    width = int(lengths.max())
    j = torch.arange(width, device=lengths.device).unsqueeze(0)  # (1, width)
    start = width - lengths.unsqueeze(1)  # (B, 1): first real slot of prefix b
    src = root_offsets.unsqueeze(1) + (j - start).clamp(min=0)  # (B, width): source position in the root's row
    device = cache.layers[0].keys.device  # moved once (a no-op below unless layers sit on several devices)
    src, root_rows = src.to(device), root_rows.to(device)
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name)  # (R, H, W, D)
            rows = t.index_select(0, root_rows.to(t.device))  # (B, H, W, D)
            idx = src.to(t.device)[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])  # (B, H, width, D)
            setattr(layer, name, torch.gather(rows, 2, idx))
