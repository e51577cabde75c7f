"""Two-pass scoring: the gold branch first, with a KV cache, then the negatives on the cached prefix.

The prefix-shared layout (:mod:`seqcpo.logps`) needs the negatives before its one forward pass. This
layout splits the same computation in two so that the negatives can be made *from* the first pass:

1. **gold pass**: rows ``[x | y_0 | pad]`` under the plain causal mask (the model's fastest kernel), keeping
   the KV cache. It gives the gold's log-probs (the MLE term and column 0 of the CPO term) and, on request,
   the full-vocabulary logits that predict each gold token: exactly what MN negatives are drawn from
   (PAPER.md, "Negatives", row MN: "one teacher-forced forward pass over x + y_0"). MN therefore costs no
   forward pass of its own when the model that makes it is the model being scored (the live reference by
   default, or the policy with ``negatives_model: policy``).
2. **negatives pass**: rows ``[y_1 | ... | y_K | pad]`` with the cache of pass 1 as past keys and values.
   A 4-D mask lets each negative see the cached prefix positions ``j < len(x)`` (never the gold) and
   itself causally; position ids restart at ``len(x)`` for every negative. The first token of every
   negative is predicted by the hidden state at the last prefix position, which pass 1 already computed.

Gradients flow through the cached keys and values into the prefix, so the losses and gradients are those
of the one-pass layouts (tests/test_two_pass.py checks both against the naive layout). Tokens processed:
``P + (K+1) C`` per example, the same as the prefix-shared row. Not usable under gradient checkpointing
(transformers drops the cache there) nor with sharded weights (FSDP, ZeRO-3); the trainer falls back to the
prefix-shared layout in those cases (:func:`two_pass_supported`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seqcpo.logps import (
    SequenceLogps,
    _attn_implementation,
    _check_batch,
    _model_dtype,
    build_prefix_shared_batch,
    cache_kwarg,
    output_cache,
    token_logps_from_hidden,
    unwrap_model,
    use_attention,
)
from seqcpo.types import CandidateBatch


def two_pass_supported(model) -> bool:
    """Whether :func:`gold_pass` + :func:`negatives_pass` can run on ``model`` as it is now."""
    inner = unwrap_model(model)
    checkpointing = getattr(inner, "is_activation_checkpointing", None)
    if checkpointing is None:  # transformers < 5.x name
        checkpointing = getattr(inner, "is_gradient_checkpointing", False)
    if checkpointing and inner.training:
        return False  # transformers drops the KV cache under gradient checkpointing in training
    return getattr(getattr(inner, "config", None), "is_encoder_decoder", False) is False


@dataclass
class GoldPass:
    """What pass 1 leaves for pass 2.

    Attributes:
        gold_logps: (N0,) float32 log-probs of every gold token (with grad when the model has it).
        gold_counts: (B,) long, gold tokens per example.
        prefix_lens: (B,) long.
        last_prefix_hidden: (B, H) the final hidden state at position ``len(x) - 1``: it predicts the first
            token of every continuation.
        cache: the model's past key values over the ``[x | y_0 | pad]`` rows (consumed by pass 2).
        cache_len: the padded length of those rows.
        gold_logits: B tensors ``(T_b, V)`` float32, detached (row t predicts gold token t), when requested.
    """

    gold_logps: torch.Tensor
    gold_counts: torch.Tensor
    prefix_lens: torch.Tensor
    last_prefix_hidden: torch.Tensor
    cache: object
    cache_kwarg: str
    cache_len: int
    gold_logits: list[torch.Tensor] | None = None
    consumed: bool = False


def gold_pass(
    model,
    prefix_ids: list[list[int]],
    gold_ids: list[list[int]],
    *,
    pad_token_id: int = 0,
    chunk_size: int = 1024,
    want_logits: bool = False,
) -> GoldPass:
    """Pass 1: the model over ``[x | y_0]`` rows with a KV cache (see the module docstring)."""
    device = next(model.parameters()).device
    gold_batch = CandidateBatch(prefix_ids=prefix_ids, candidate_ids=[[g] for g in gold_ids],
                                candidate_mask=[[True] for _ in gold_ids])
    sb = build_prefix_shared_batch(gold_batch, pad_token_id=pad_token_id, device=device)
    out = model(
        input_ids=sb.input_ids,
        attention_mask=(sb.segment_ids >= 0).long(),
        position_ids=sb.position_ids,
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=True,
    )
    if output_cache(out) is None:
        raise RuntimeError("two_pass: the model returned no KV cache (gradient checkpointing drops it); use layout 'shared'")
    hidden = out.hidden_states[-1]  # (B, L, H)
    prefix_lens = torch.tensor([len(p) for p in prefix_ids], dtype=torch.long, device=device)
    h = hidden[sb.src_row, sb.src_pos]  # (N0, H)
    gold_logps = token_logps_from_hidden(model, h, sb.targets, chunk_size=chunk_size)
    logits = None
    if want_logits:
        logits = _gold_logits(model, h.detach(), sb.token_counts[:, 0].tolist(), chunk_size)
    return GoldPass(
        gold_logps=gold_logps,
        gold_counts=sb.token_counts[:, 0],
        prefix_lens=prefix_lens,
        last_prefix_hidden=hidden[torch.arange(len(prefix_ids), device=device), prefix_lens - 1],
        cache=output_cache(out),
        cache_kwarg=cache_kwarg(out),
        cache_len=sb.input_ids.shape[1],
        gold_logits=logits,
    )


def _gold_logits(model, h: torch.Tensor, counts: list[int], chunk_size: int) -> list[torch.Tensor]:
    """Full-vocabulary logits (float32, no grad) at the gold positions, split per example."""
    head = unwrap_model(model).get_output_embeddings()
    softcap = getattr(unwrap_model(model).config, "final_logit_softcapping", None)
    with torch.no_grad():
        parts = [head(h[s : s + chunk_size]).float() for s in range(0, h.shape[0], chunk_size)]
        logits = torch.cat(parts) if parts else h.new_zeros((0, head.weight.shape[0]), dtype=torch.float32)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
    return list(torch.split(logits, counts))


def _negatives_mask(prefix_lens, cache_len, segment_ids, dtype):
    """(B, 1, Lq, cache_len + Lq): cached key j < len(x) (the prefix, never the gold), or a new key in the
    query's own segment at or before it. Every query sees the prefix, so no row is fully masked."""
    B, Lq = segment_ids.shape
    device = segment_ids.device
    to_prefix = torch.arange(cache_len, device=device)[None, :] < prefix_lens[:, None]  # (B, cache_len)
    to_prefix = to_prefix[:, None, None, :].expand(B, 1, Lq, cache_len)
    causal = torch.ones(Lq, Lq, dtype=torch.bool, device=device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    own = (causal[None] & same)[:, None]  # (B, 1, Lq, Lq)
    allowed = torch.cat([to_prefix, own], dim=-1)
    if dtype is None:
        return allowed
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def negatives_pass(
    model,
    gp: GoldPass,
    negative_ids: list[list[list[int]]],
    *,
    pad_token_id: int = 0,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pass 2: the K negatives of every example on the cached prefix of :func:`gold_pass`.

    Returns ``(flat_logps (N,), neg_index (N,) = b * K + i, counts (B, K))``. Consumes ``gp.cache``.
    """
    if gp.consumed:
        raise RuntimeError("negatives_pass: this GoldPass's cache was already used")
    gp.consumed = True
    device = gp.prefix_lens.device
    B = len(negative_ids)
    K = len(negative_ids[0]) if B else 0
    counts = torch.tensor([[len(n) for n in row] for row in negative_ids], dtype=torch.long).reshape(B, K)
    Lq = int(counts.sum(1).max()) if B and K else 0
    first_rows, first_targets, first_index = [], [], []
    src_row, src_pos, targets, index = [], [], [], []
    input_ids = torch.full((B, max(Lq, 1)), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((B, max(Lq, 1)), dtype=torch.long)
    segment_ids = torch.full((B, max(Lq, 1)), -1, dtype=torch.long)
    for b, row in enumerate(negative_ids):
        if len(row) != K:
            raise ValueError(f"example {b}: {len(row)} negatives, expected {K}")
        P = int(gp.prefix_lens[b])
        start = 0
        for i, neg in enumerate(row):
            n = len(neg)
            if n == 0:
                continue
            input_ids[b, start : start + n] = torch.tensor(neg, dtype=torch.long)
            position_ids[b, start : start + n] = torch.arange(P, P + n)
            segment_ids[b, start : start + n] = i
            first_rows.append(b)
            first_targets.append(neg[0])
            first_index.append(b * K + i)
            src_row.extend([b] * (n - 1))
            src_pos.extend(range(start, start + n - 1))
            targets.extend(neg[1:])
            index.extend([b * K + i] * (n - 1))
            start += n
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    # token 0 of every negative: predicted by pass 1's hidden state at the last prefix position
    h_first = gp.last_prefix_hidden[as_long(first_rows)] if first_rows else gp.last_prefix_hidden[:0]
    parts = [token_logps_from_hidden(model, h_first, as_long(first_targets), chunk_size=chunk_size)]
    idx = [as_long(first_index)]
    if src_row:
        impl = _attn_implementation(model)
        # a FlexAttention BlockMask or a flash kernel cannot take this (query, cache + query) mask: use SDPA
        run_impl = impl if impl in ("sdpa", "eager") else "sdpa"
        seg = segment_ids.to(device)
        mask = _negatives_mask(gp.prefix_lens, gp.cache_len, seg, _model_dtype(model) if run_impl == "eager" else None)
        with use_attention(model, None if run_impl == impl else run_impl):
            out = model(
                input_ids=input_ids.to(device),
                attention_mask=mask,
                position_ids=position_ids.to(device),
                output_hidden_states=True,
                logits_to_keep=1,
                use_cache=True,
                **{gp.cache_kwarg: gp.cache},
            )
        hidden = out.hidden_states[-1]
        parts.append(token_logps_from_hidden(model, hidden[as_long(src_row), as_long(src_pos)], as_long(targets),
                                             chunk_size=chunk_size))
        idx.append(as_long(index))
    gp.cache = None  # pass 2 appended to it: nothing else may read it
    return torch.cat(parts), torch.cat(idx), counts.to(device)


def combine(gp: GoldPass, neg_flat, neg_index, neg_counts, length_normalize: bool = False) -> SequenceLogps:
    """Gold (column 0) and negatives (columns 1..K) -> :class:`SequenceLogps` (B, K+1)."""
    B, K = neg_counts.shape
    device = gp.gold_logps.device
    summed = torch.zeros(B, K + 1, dtype=torch.float32, device=device)
    gold_index = torch.repeat_interleave(torch.arange(B, device=device), gp.gold_counts)
    summed[:, 0] = torch.zeros(B, dtype=torch.float32, device=device).index_add(0, gold_index, gp.gold_logps)
    if K:
        neg = torch.zeros(B * K, dtype=torch.float32, device=device).index_add(0, neg_index, neg_flat)
        summed[:, 1:] = neg.view(B, K)
    counts = torch.cat([gp.gold_counts[:, None], neg_counts], dim=1)
    logps = summed / counts.clamp(min=1) if length_normalize else summed
    return SequenceLogps(logps=logps, token_counts=counts, summed=summed)


def two_pass_sequence_logps(
    model,
    batch: CandidateBatch,
    *,
    pad_token_id: int = 0,
    length_normalize: bool = False,
    chunk_size: int = 1024,
) -> SequenceLogps:
    """``logp(y_i | x)`` of every candidate (column 0 the gold) by the two passes; same numbers as the other
    layouts of :func:`seqcpo.logps.sequence_logps`."""
    _check_batch(batch)
    gp = gold_pass(model, batch.prefix_ids, [c[0] for c in batch.candidate_ids], pad_token_id=pad_token_id,
                   chunk_size=chunk_size)
    flat, index, counts = negatives_pass(model, gp, [c[1:] for c in batch.candidate_ids], pad_token_id=pad_token_id,
                                         chunk_size=chunk_size)
    return combine(gp, flat, index, counts, length_normalize)
