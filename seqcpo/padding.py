"""Token-id lists -> one padded batch: the single place that builds (input_ids, attention_mask) pairs."""

from __future__ import annotations

from typing import Sequence

import torch


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, *, side: str = "right", min_width: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists to one width. Returns input_ids (B, T) long and attention_mask (B, T) long (1 = real).

    ``side``: "right" (teacher-forced scoring) or "left" (prompts for decoding). ``min_width``: the least T,
    so an all-empty batch still gives a model-sized tensor.

    >>> ids, mask = pad_batch([[5, 6], [7]], 0, side="left")
    >>> ids.tolist(), mask.tolist()
    ([[5, 6], [0, 7]], [[1, 1], [0, 1]])
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    width = max([min_width] + [len(s) for s in seqs])
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s)
        if n:
            cols = slice(0, n) if side == "right" else slice(width - n, width)
            ids[i, cols] = torch.tensor(list(s), dtype=torch.long)
            mask[i, cols] = 1
    return ids, mask
