"""Sequence log-probabilities ``logp(y_i | x)`` of K+1 continuations per prefix (docs/method.md, "The objective").

These layouts compute the same numbers:

- **naive** (:func:`naive_sequence_logps`): every (prefix, continuation) pair is its own row,
  ``B*(K+1)`` rows. Kept as the reference implementation the fast path is tested against.
- **prefix-shared** (:func:`shared_sequence_logps`, the default): one row per example holding the prefix
  once, then all K+1 continuations back to back::

      [ x_0 .. x_{P-1} | y_0 tokens | y_1 tokens | ... | y_K tokens | pad ]

  Under the attention mask each continuation sees the whole prefix and itself causally, never another
  continuation; position ids restart at P for every continuation, so each continuation's tokens have
  exactly the positions they would have in its own row. Hidden states are gathered at the positions that
  predict continuation tokens only (the last prefix position predicts the first token of every
  continuation), and the LM head plus log-softmax run on those in chunks, so no
  (rows x length x vocabulary) float32 tensor is ever built.

- **packed** (:mod:`seqcpo.packing`): the prefix-shared rows of the batch end to end in one sequence, no
  padding (document masking), for batches of mixed lengths.
- **two_pass** (:mod:`seqcpo.two_pass`): the gold with a KV cache, then the negatives on it.

All return :class:`SequenceLogps`: ``logps`` (B, K+1), summed over each continuation's tokens
(divided by the token count when ``length_normalize``), and ``token_counts`` (B, K+1).
"""

from __future__ import annotations

import torch

from seqcpo.hf_model import attn_implementation, final_hidden, model_dtype, needs_grad, use_attention, warn_once
from seqcpo.packing import packed_sequence_logps, packed_tokens, packing_supported
from seqcpo.padding import pad_batch
from seqcpo.prefix_shared import PrefixSharedBatch, build_prefix_shared_batch, check_batch
from seqcpo.token_logps import SequenceLogps, sum_token_logps, token_logps_from_hidden
from seqcpo.two_pass import two_pass_sequence_logps, two_pass_supported, two_pass_tokens
from seqcpo.types import CandidateBatch


def shared_attention_mask(model, sb: PrefixSharedBatch):
    """The mask to hand the model for ``sb``, and the attention implementation to run it under.

    Returns ``(mask, impl)``, ``impl`` None when the model's own implementation is used:

    - one continuation per row (the MLE batch): the layout is plain causal, so a 2-D padding mask goes in
      and the model's causal kernel runs (no (B, 1, L, L) mask is built, SDPA may take ``is_causal``);
    - ``flex_attention``: a FlexAttention ``BlockMask`` (:meth:`PrefixSharedBatch.block_mask`). torch 2.13
      has no FlexAttention backward on CPU, so a CPU call that needs gradients falls back to SDPA with the
      dense boolean mask (same numbers, see tests/test_fast_paths.py);
    - ``sdpa``: dense boolean (B, 1, L, L) mask; ``eager``: the additive mask in the model's dtype;
    - flash-attention kernels take no arbitrary 4-D mask: they fall back to SDPA with the dense mask.
    """
    impl = attn_implementation(model)
    if sb.single_segment:
        return (sb.segment_ids >= 0).long(), None
    if impl == "flex_attention":
        if sb.input_ids.device.type == "cpu" and needs_grad(model):
            warn_once("FlexAttention has no backward on CPU in this torch: running SDPA with a dense mask instead")
            return sb.attention_mask(None), "sdpa"
        return sb.block_mask(), None
    if impl == "sdpa":
        return sb.attention_mask(None), None
    if impl == "eager":
        return sb.attention_mask(model_dtype(model)), None
    if impl.startswith("flash_attention") or impl.startswith("paged"):
        warn_once(f"attn_implementation={impl!r} takes no prefix-shared 4-D mask: running SDPA with a dense mask instead")
        return sb.attention_mask(None), "sdpa"
    return sb.attention_mask(None), None  # kernels registered by the user: assume they take a boolean mask


def shared_sequence_logps(
    model,
    batch: CandidateBatch,
    *,
    pad_token_id: int = 0,
    length_normalize: bool = False,
    chunk_size: int = 1024,
    head_in_forward: bool = False,
) -> SequenceLogps:
    """Prefix-shared log-probs of every candidate (the fast path; see the module docstring).

    ``head_in_forward``: apply the LM head inside the model's own forward (needed when its weights are
    sharded by FSDP or DeepSpeed ZeRO-3); by default the head runs outside, chunked, on continuation
    positions only.
    """
    device = next(model.parameters()).device
    sb = build_prefix_shared_batch(batch, pad_token_id=pad_token_id, device=device)
    mask, impl = shared_attention_mask(model, sb)
    if head_in_forward:
        # Sharded (FSDP / ZeRO-3) weights exist only inside the model's forward: let it apply the head to every
        # position, then pick the continuation positions. Costs a (B, L, V) logits tensor in the model dtype.
        with use_attention(model, impl):
            logits = model(
                input_ids=sb.input_ids, attention_mask=mask, position_ids=sb.position_ids, use_cache=False
            ).logits
        flat = torch.cat(
            [
                torch.log_softmax(logits[r, p].float(), -1).gather(1, t[:, None]).squeeze(1)
                for r, p, t in _chunks(sb.src_row, sb.src_pos, sb.targets, chunk_size)
            ]
        )
        return sum_token_logps(flat, sb.cand_index, sb.token_counts, length_normalize)
    with use_attention(model, impl):
        hidden = final_hidden(model, sb.input_ids, mask, sb.position_ids)  # (B, L, H)
    h = hidden[sb.src_row, sb.src_pos]  # (N, H)
    flat = token_logps_from_hidden(model, h, sb.targets, chunk_size=chunk_size)
    return sum_token_logps(flat, sb.cand_index, sb.token_counts, length_normalize)


def _chunks(rows, pos, targets, size):
    for s in range(0, rows.shape[0], size):
        yield rows[s : s + size], pos[s : s + size], targets[s : s + size]


def naive_sequence_logps(
    model,
    batch: CandidateBatch,
    *,
    pad_token_id: int = 0,
    length_normalize: bool = False,
) -> SequenceLogps:
    """Reference implementation: one right-padded row per (prefix, candidate), full-vocabulary logits."""
    check_batch(batch)
    device = next(model.parameters()).device
    k1 = batch.num_candidates
    rows, prefix_lens = [], []
    for prefix, cands in zip(batch.prefix_ids, batch.candidate_ids):
        for cand in cands:
            rows.append(list(prefix) + list(cand))
            prefix_lens.append(len(prefix))
    input_ids, attn = pad_batch(rows, pad_token_id)
    input_ids, attn = input_ids.to(device), attn.to(device)
    logits = model(input_ids=input_ids, attention_mask=attn, use_cache=False).logits.float()  # (R, L, V)
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    tok = logprobs.gather(2, input_ids[:, 1:, None]).squeeze(2)  # (R, L-1): logp of token j+1
    flat, idx = [], []
    counts = torch.zeros((len(batch), k1), dtype=torch.long)
    for r, (row, P) in enumerate(zip(rows, prefix_lens)):
        n = len(row) - P
        counts[r // k1, r % k1] = n
        if n:
            flat.append(tok[r, P - 1 : P - 1 + n])
            idx.extend([r] * n)
    flat_t = torch.cat(flat) if flat else torch.zeros(0, device=device)
    return sum_token_logps(flat_t, torch.tensor(idx, dtype=torch.long, device=device), counts.to(device), length_normalize)


LAYOUTS = ("auto", "shared", "packed", "two_pass", "naive")
AUTO_TWO_PASS_SAVING = 0.15
AUTO_PACKED_SAVING = 0.10


def choose_layout(model, batch: CandidateBatch, *, head_in_forward: bool = False) -> str:
    """The layout ``auto`` runs ``batch`` in, by the tokens each would run:

    - "two_pass" when it runs at least ``AUTO_TWO_PASS_SAVING`` fewer tokens than the unpadded prefix-shared
      rows (its negatives share long beginnings with the gold, as truncation negatives do) and the model can
      run it (a KV cache in training, the head outside the forward);
    - else "packed" when padding the rows to the longest would add at least ``AUTO_PACKED_SAVING`` of the
      padded tokens (mixed lengths; :mod:`seqcpo.packing`);
    - else "shared"."""
    if head_in_forward:
        return "shared"
    if batch.num_candidates >= 2 and two_pass_supported(model):
        one, two = two_pass_tokens(batch)
        if two <= (1.0 - AUTO_TWO_PASS_SAVING) * one:
            return "two_pass"
    padded, packed = packed_tokens(batch)
    if packing_supported(model) and packed <= (1.0 - AUTO_PACKED_SAVING) * padded:
        return "packed"
    return "shared"


def sequence_logps(
    model,
    batch: CandidateBatch,
    *,
    layout: str = "shared",
    pad_token_id: int = 0,
    length_normalize: bool = False,
    chunk_size: int = 1024,
    head_in_forward: bool = False,
) -> SequenceLogps:
    """``logp(y_i|x)`` for every candidate of every example, (B, K+1); ``layout`` is "shared", "packed"
    (:mod:`seqcpo.packing`), "two_pass" (:mod:`seqcpo.two_pass`), "naive", or "auto" (:func:`choose_layout`,
    per batch). All give the same numbers."""
    if layout == "auto":
        layout = choose_layout(model, batch, head_in_forward=head_in_forward)
    if layout == "shared":
        return shared_sequence_logps(
            model, batch, pad_token_id=pad_token_id, length_normalize=length_normalize, chunk_size=chunk_size,
            head_in_forward=head_in_forward,
        )
    if layout == "packed":
        if head_in_forward:
            raise ValueError("layout 'packed' applies the LM head outside the model's forward: "
                             "use 'shared' with sharded weights")
        return packed_sequence_logps(model, batch, length_normalize=length_normalize, chunk_size=chunk_size)
    if layout == "naive":
        return naive_sequence_logps(model, batch, pad_token_id=pad_token_id, length_normalize=length_normalize)
    if layout == "two_pass":
        if head_in_forward:
            raise ValueError("layout 'two_pass' applies the LM head outside the model's forward: use 'shared' with sharded weights")
        return two_pass_sequence_logps(
            model, batch, pad_token_id=pad_token_id, length_normalize=length_normalize, chunk_size=chunk_size
        )
    raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
