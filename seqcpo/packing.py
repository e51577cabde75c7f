"""Packed rows: every example's prefix-shared row laid end to end in one sequence, no padding.

The prefix-shared layout (:mod:`seqcpo.prefix_shared`) pads B rows to the longest, so a batch of mixed
lengths runs ``B * max_b L_b`` tokens. Packed, the same B rows become one sequence of ``T = sum_b L_b``
tokens::

    [ example 0: x | y_0 | ... | y_K ][ example 1: x | y_0 | ... | y_K ] ... (no pad)

Position ids restart for every example exactly as in its own row, and the mask adds document masking to
the prefix-shared one: query q may attend key j iff both are in the same example, j <= q, and j is a prefix
token or in q's continuation. The numbers are those of the other layouts (tests/test_packing.py, within 1e-4).

How attention runs on that mask:

- ``flex_attention`` (CUDA): a FlexAttention ``BlockMask`` over (1, T, T) whose mask_mod carries the
  document ids; blocks between two examples are empty and skipped, so attention costs ``sum_b L_b^2``-ish.
- under activation checkpointing in training (not FlexAttention): the model's own ``sdpa`` or ``eager``
  attention on the dense mask. A layer recomputed in backward runs outside this module's context, so the
  attention function below would not be the one it recomputes with; the dense mask is exact but attention
  then costs T^2, so ``auto`` does not pack there.
- anything else (and FlexAttention on CPU with gradients, which torch 2.13 lacks): the model runs under the
  attention function :func:`document_attention`, registered with transformers as ``"seqcpo_documents"``: it
  runs SDPA once per example on that example's block of the (1, 1, T, T) boolean mask, so the work is per
  example (the off-diagonal blocks are never computed), and it is exact. The dense boolean mask is what the
  model is handed, so a model that bypasses the attention interface still computes the right numbers.

:func:`packed_tokens` counts what each layout runs; ``logps_layout: auto`` packs when it saves
``AUTO_PACKED_SAVING`` of the padded tokens (:func:`seqcpo.logps.choose_layout`).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch

from seqcpo.hf_model import (
    attn_implementation,
    checkpointing_in_training,
    final_hidden,
    model_dtype,
    needs_grad,
    unwrap_model,
    use_attention,
)
from seqcpo.prefix_shared import build_prefix_shared_batch
from seqcpo.token_logps import SequenceLogps, sum_token_logps, token_logps_from_hidden
from seqcpo.types import CandidateBatch

DOCUMENT_ATTENTION = "seqcpo_documents"


@dataclass
class PackedBatch:
    """B examples' prefix-shared rows in one sequence of T tokens.

    Attributes:
        input_ids: (1, T) long.
        position_ids: (1, T) long; per example, prefix 0..P-1 and each candidate P..P+n_i-1.
        doc_ids: (T,) long, the example each token belongs to.
        segment_ids: (T,) long; 0 prefix, i+1 candidate i.
        bounds: B pairs (start, end) of each example's tokens in the sequence.
        src_pos: (N,) long, the position whose hidden state predicts each target token.
        targets: (N,) long, the continuation tokens.
        cand_index: (N,) long, flat index b*(K+1)+i of each target's candidate.
        token_counts: (B, K+1) long.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    doc_ids: torch.Tensor
    segment_ids: torch.Tensor
    bounds: list[tuple[int, int]]
    src_pos: torch.Tensor
    targets: torch.Tensor
    cand_index: torch.Tensor
    token_counts: torch.Tensor

    def attention_mask(self) -> torch.Tensor:
        """(1, 1, T, T) bool, True = attend: same example, causal, and the key a prefix token or in the query's
        continuation. Every query sees its example's first token, so no row is fully masked."""
        doc, seg = self.doc_ids, self.segment_ids
        T = doc.shape[0]
        causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
        allowed = causal & (doc[:, None] == doc[None, :]) & ((seg[:, None] == seg[None, :]) | (seg == 0)[None, :])
        return allowed[None, None]

    def block_mask(self, block_size: int = 128):
        """The same mask as a FlexAttention ``BlockMask`` (1, 1, T, T): document masking plus the prefix-shared
        mask_mod; blocks across examples or above the diagonal are empty and skipped by the kernel."""
        from torch.nn.attention.flex_attention import create_block_mask

        doc, seg = self.doc_ids, self.segment_ids
        T = doc.shape[0]

        def mask_mod(b, h, q, kv):
            s_kv = seg[kv]
            return (kv <= q) & (doc[q] == doc[kv]) & ((seg[q] == s_kv) | (s_kv == 0))

        return create_block_mask(mask_mod, 1, None, T, T, device=doc.device, BLOCK_SIZE=block_size)


def build_packed_batch(batch: CandidateBatch, device: torch.device | str = "cpu") -> PackedBatch:
    """Lay out B examples as one packed sequence (see the module docstring)."""
    sb = build_prefix_shared_batch(batch)  # (B, L) rows on the CPU; their real tokens are packed below
    lengths = (sb.segment_ids >= 0).sum(1).tolist()
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    keep = sb.segment_ids >= 0  # row-major order = example 0's tokens, then example 1's, ...
    doc = torch.arange(len(lengths))[:, None].expand_as(sb.segment_ids)
    offsets = torch.tensor(starts, dtype=torch.long)
    return PackedBatch(
        input_ids=sb.input_ids[keep][None].to(device),
        position_ids=sb.position_ids[keep][None].to(device),
        doc_ids=doc[keep].to(device),
        segment_ids=sb.segment_ids[keep].to(device),
        bounds=[(s, s + n) for s, n in zip(starts, lengths)],
        src_pos=(sb.src_pos + offsets[sb.src_row]).to(device),
        targets=sb.targets.to(device),
        cand_index=sb.cand_index.to(device),
        token_counts=sb.token_counts.to(device),
    )


def packed_tokens(batch: CandidateBatch) -> tuple[int, int]:
    """(tokens the padded prefix-shared rows run, ``B * max_b L_b``; tokens the packed sequence runs, ``sum_b L_b``)."""
    lengths = [len(p) + sum(len(c) for c in cands) for p, cands in zip(batch.prefix_ids, batch.candidate_ids)]
    return len(lengths) * max(lengths, default=0), sum(lengths)


# ---- attention over documents -------------------------------------------------------------------------

_BOUNDS: contextvars.ContextVar[list[tuple[int, int]] | None] = contextvars.ContextVar("seqcpo_packed_bounds", default=None)


def document_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """A transformers attention function: SDPA once per example of the packed sequence.

    query (1, H, T, D), key/value (1, H_kv, T, D), attention_mask (1, 1, T, T) bool -> (1, T, H, D), None.
    Each example attends only within its own block of the mask (document masking), so the blocks between
    examples, all masked, are not computed. Outside :func:`packed_sequence_logps` (no bounds set) it is plain
    SDPA on the whole mask: slower, same numbers.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("is_causal", None)  # some models pass their own; the mask decides here
    bounds = _BOUNDS.get()
    if bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=False, **kwargs)
    outs = []
    for block in bounds:
        if isinstance(block, AttentionBlock):
            out = _block_attention(module, query, key, value, block, dropout, scaling, **kwargs)
        else:
            s, e = block
            mask = attention_mask[..., s:e, s:e] if attention_mask is not None else None
            out, _ = sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], mask,
                                            dropout=dropout, scaling=scaling, is_causal=mask is None, **kwargs)
        outs.append(out)  # (1, n, H, D)
    return torch.cat(outs, dim=1), None


@dataclass(frozen=True)
class AttentionBlock:
    """Queries ``q0:q1`` of a packed sequence attending to the keys of ``key_spans`` (concatenated in order):
    under ``mask`` ((q1 - q0, keys) bool, True = attend), or causally when ``mask`` is None (then the one key
    span is the queries' own). Blocks listed in query order and covering the sequence replace its dense mask
    in :func:`document_attention`, so attention costs only the pairs a block holds (a document row's branches
    see the row up to their anchor, not the whole row and every other branch)."""

    q0: int
    q1: int
    key_spans: tuple[tuple[int, int], ...]
    mask: torch.Tensor | None = None


def _block_attention(module, query, key, value, block: AttentionBlock, dropout, scaling, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def keys(t):
        parts = [t[:, :, s:e] for s, e in block.key_spans]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    mask = None if block.mask is None else block.mask.to(query.device)[None, None]
    out, _ = sdpa_attention_forward(module, query[:, :, block.q0:block.q1], keys(key), keys(value), mask,
                                    dropout=dropout, scaling=scaling, is_causal=mask is None, **kwargs)
    return out


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(DOCUMENT_ATTENTION, document_attention)
    try:  # 4-D masks go through as they are; registering the mask maker keeps a 2-D call path valid too
        from transformers import AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask

        AttentionMaskInterface.register(DOCUMENT_ATTENTION, sdpa_mask)
    except ImportError:
        pass


_register()


@contextlib.contextmanager
def packed_documents(bounds: list):
    """Tell :func:`document_attention` where the examples of the packed sequence start and end: (start, end)
    pairs (each example attends within its block of the dense mask), or :class:`AttentionBlock` s."""
    token = _BOUNDS.set(bounds)
    try:
        yield
    finally:
        _BOUNDS.reset(token)


def packing_supported(model) -> bool:
    """Whether the packed layout runs ``model`` efficiently now: a decoder-only model whose attention goes
    through transformers' attention interface with no logit soft-capping (SDPA takes none), and no activation
    checkpointing in training unless under FlexAttention (see the module docstring)."""
    cfg = getattr(unwrap_model(model), "config", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False):
        return False
    if checkpointing_in_training(model) and attn_implementation(model) != "flex_attention":
        return False
    return getattr(cfg, "attn_logit_softcapping", None) is None


def packed_sequence_logps(
    model,
    batch: CandidateBatch,
    *,
    length_normalize: bool = False,
    chunk_size: int = 1024,
) -> SequenceLogps:
    """``logp(y_i|x)`` of every candidate, (B, K+1), from one packed forward pass (see the module docstring)."""
    device = next(model.parameters()).device
    pb = build_packed_batch(batch, device=device)
    hidden = packed_hidden(model, pb)  # (1, T, H)
    flat = token_logps_from_hidden(model, hidden[0, pb.src_pos], pb.targets, chunk_size=chunk_size)
    return sum_token_logps(flat, pb.cand_index, pb.token_counts, length_normalize)


def packed_hidden(model, pb) -> torch.Tensor:
    """(1, T, H) final hidden states of a packed sequence ``pb``: anything with ``input_ids`` and ``position_ids``
    (1, T), ``bounds`` (the examples' spans), ``attention_mask()`` (1, 1, T, T) bool and ``block_mask()``
    (:class:`PackedBatch`, :class:`seqcpo.document_rows.DocumentLayout`), run as the module docstring says."""
    device = pb.input_ids.device
    impl = attn_implementation(model)
    if impl == "flex_attention" and not (device.type == "cpu" and needs_grad(model)):
        mask, run_impl, ctx = pb.block_mask(), None, contextlib.nullcontext()
    elif checkpointing_in_training(model) and needs_grad(model):
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"layout 'packed' under gradient checkpointing runs the model's own attention on a dense "
                             f"mask: it needs attn_implementation sdpa, eager or flex_attention, not {impl!r}")
        mask = pb.attention_mask()
        if impl == "eager":
            dtype = model_dtype(model)
            mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
        run_impl, ctx = None, contextlib.nullcontext()
    else:
        blocks = pb.attention_blocks() if hasattr(pb, "attention_blocks") else pb.bounds
        mask, run_impl, ctx = pb.attention_mask(), DOCUMENT_ATTENTION, packed_documents(blocks)
    with use_attention(model, run_impl), ctx:
        return final_hidden(model, pb.input_ids, mask, pb.position_ids)
