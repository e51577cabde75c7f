"""The prefix-shared layout's tensors: one row per example, the prefix once, then all K+1 continuations.

::

    [ x_0 .. x_{P-1} | y_0 tokens | y_1 tokens | ... | y_K tokens | pad ]

Under the attention mask each continuation sees the whole prefix and itself causally, never another
continuation; position ids restart at P for every continuation, so each continuation's tokens have exactly
the positions they would have in its own row. :mod:`seqcpo.logps` runs the model on these rows,
:mod:`seqcpo.two_pass` builds its gold rows with them and :mod:`seqcpo.packing` packs them into one sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seqcpo.types import CandidateBatch


@dataclass
class PrefixSharedBatch:
    """Tensors of the prefix-shared layout for B examples with K+1 candidates each.

    Attributes:
        input_ids: (B, L) long, right-padded.
        position_ids: (B, L) long; prefix 0..P-1, each candidate P..P+n_i-1, padding 0.
        segment_ids: (B, L) long; 0 prefix, i+1 candidate i, -1 padding.
        src_row, src_pos: (N,) long, the (row, position) whose hidden state predicts each target token.
        targets: (N,) long, the continuation tokens, N = total continuation tokens in the batch.
        cand_index: (N,) long, flat index b*(K+1)+i of the candidate each target belongs to.
        token_counts: (B, K+1) long.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    src_row: torch.Tensor
    src_pos: torch.Tensor
    targets: torch.Tensor
    cand_index: torch.Tensor
    token_counts: torch.Tensor

    def attention_mask(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(B, 1, L, L) mask: query q may attend key j iff j <= q and j is a prefix token or in q's segment.

        Returned as bool (True = attend) when ``dtype`` is None, for SDPA; else additive in ``dtype``
        (0 or the dtype's minimum), for eager attention. Padding queries attend to earlier padding and the
        prefix, so no row is fully masked (a fully masked row would give NaN under SDPA).
        """
        seg = self.segment_ids
        L = seg.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=seg.device).tril()
        same = seg[:, :, None] == seg[:, None, :]
        to_prefix = (seg == 0)[:, None, :]
        allowed = (causal[None] & (same | to_prefix))[:, None]  # (B, 1, L, L)
        if dtype is None:
            return allowed
        mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)

    def block_mask(self, block_size: int = 128):
        """The same mask as a FlexAttention ``BlockMask`` (B, 1, L, L), for ``attn_implementation="flex_attention"``.

        mask_mod: ``kv <= q and (segment[kv] == segment[q] or segment[kv] == 0)``. Blocks that mask_mod
        leaves empty (one continuation against another, anything above the diagonal) are skipped by the
        kernel, so attention costs what the prefix-shared structure needs, not L x L.
        """
        from torch.nn.attention.flex_attention import create_block_mask

        seg = self.segment_ids
        B, L = seg.shape

        def mask_mod(b, h, q, kv):
            s_kv = seg[b, kv]
            return (kv <= q) & ((seg[b, q] == s_kv) | (s_kv == 0))

        return create_block_mask(mask_mod, B, None, L, L, device=seg.device, BLOCK_SIZE=block_size)

    @property
    def single_segment(self) -> bool:
        """True when every row holds one continuation (the MLE batch): the mask is then plain causal."""
        return int(self.segment_ids.max()) <= 1


def check_batch(batch: CandidateBatch) -> None:
    k1 = batch.num_candidates
    for b, (prefix, cands) in enumerate(zip(batch.prefix_ids, batch.candidate_ids)):
        if len(prefix) == 0:
            raise ValueError(f"example {b}: empty prefix; a continuation needs at least one prefix token to condition on")
        if len(cands) != k1:
            raise ValueError(f"example {b}: {len(cands)} candidates, expected {k1} (every example needs K+1)")


def build_prefix_shared_batch(
    batch: CandidateBatch, pad_token_id: int = 0, device: torch.device | str = "cpu", pad_to_multiple_of: int = 1
) -> PrefixSharedBatch:
    """Lay out B examples as B prefix-shared rows (see the module docstring)."""
    check_batch(batch)
    k1 = batch.num_candidates
    lengths = [len(p) + sum(len(c) for c in cands) for p, cands in zip(batch.prefix_ids, batch.candidate_ids)]
    L = max(lengths)
    if pad_to_multiple_of > 1:
        L = -(-L // pad_to_multiple_of) * pad_to_multiple_of
    B = len(batch)
    input_ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((B, L), dtype=torch.long)
    segment_ids = torch.full((B, L), -1, dtype=torch.long)
    src_row, src_pos, targets, cand_index = [], [], [], []
    token_counts = torch.zeros((B, k1), dtype=torch.long)
    for b, (prefix, cands) in enumerate(zip(batch.prefix_ids, batch.candidate_ids)):
        P = len(prefix)
        input_ids[b, :P] = torch.tensor(prefix, dtype=torch.long)
        position_ids[b, :P] = torch.arange(P)
        segment_ids[b, :P] = 0
        start = P
        for i, cand in enumerate(cands):
            n = len(cand)
            token_counts[b, i] = n
            if n == 0:
                continue
            input_ids[b, start : start + n] = torch.tensor(cand, dtype=torch.long)
            position_ids[b, start : start + n] = torch.arange(P, P + n)
            segment_ids[b, start : start + n] = i + 1
            # token t of candidate i is predicted at the last prefix position (t = 0) or at start + t - 1
            src_row.extend([b] * n)
            src_pos.append(P - 1)
            src_pos.extend(range(start, start + n - 1))
            targets.extend(cand)
            cand_index.extend([b * k1 + i] * n)
            start += n
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    return PrefixSharedBatch(
        input_ids=input_ids.to(device),
        position_ids=position_ids.to(device),
        segment_ids=segment_ids.to(device),
        src_row=as_long(src_row),
        src_pos=as_long(src_pos),
        targets=as_long(targets),
        cand_index=as_long(cand_index),
        token_counts=token_counts.to(device),
    )
