"""Two-pass scoring: the gold branch first, with a KV cache, then the negatives on the cached prefix.

The prefix-shared layout (:mod:`seqcpo.logps`) needs the negatives before its one forward pass. This
layout splits the same computation in two so that the negatives can be made *from* the first pass, and so
that what a negative shares with the gold is not run again:

1. **gold pass**: rows ``[x | y_0 | pad]`` under the plain causal mask (the model's fastest kernel), keeping
   the KV cache. It gives the gold's log-probs (the MLE term and column 0 of the CPO term) and, on request,
   the full-vocabulary logits that predict each gold token: exactly what MN negatives are drawn from
   (docs/method.md, "Negatives", row MN: "one teacher-forced forward pass over x + y_0"). MN therefore costs no
   forward pass of its own when the model that makes it is the model being scored (the live reference by
   default, or the policy with ``negatives_model: policy``).
2. **negatives pass**: a negative that agrees with the gold on its first m tokens (a truncation negative
   ``y_0[:j] + EOS`` on all but its last; an MN negative up to its first replaced token) takes those m
   log-probs from the gold, its token m from pass 1's hidden state at ``len(x) + m - 1``, and runs only its
   tokens m..n-2 here, as rows ``[y_1 rest | ... | y_K rest | pad]`` with the cache of pass 1 as past keys and
   values. A 4-D mask lets each of them see the cached prefix and the m gold tokens it shares, never the rest
   of the gold, and its own tokens causally; position ids continue at ``len(x) + m``.

Gradients flow through the shared gold log-probs and through the cached keys and values, so the losses and
gradients are those of the one-pass layouts (tests/test_two_pass.py checks both against the naive layout).
Tokens processed: ``P + C_0 + sum_i (C_i - m_i - 1)`` per example, against ``P + sum_i C_i`` for the
prefix-shared row (:func:`two_pass_tokens`); with truncation negatives, a large saving. Not usable under
gradient checkpointing (transformers drops the cache there) nor with sharded weights (FSDP, ZeRO-3): the
``auto`` layout (:func:`seqcpo.logps.choose_layout`) falls back to the prefix-shared row in those cases.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from seqcpo.hf_model import attn_implementation, cache_kwarg, model_dtype, output_cache, unwrap_model, use_attention
from seqcpo.prefix_shared import build_prefix_shared_batch, check_batch
from seqcpo.token_logps import SequenceLogps, sum_token_logps, token_logps_from_hidden
from seqcpo.types import CandidateBatch


def two_pass_supported(model) -> bool:
    """Whether :func:`gold_pass` + :func:`negatives_pass` can run on ``model`` as it is now."""
    inner = unwrap_model(model)
    checkpointing = getattr(inner, "is_activation_checkpointing", None)
    if checkpointing is None:  # transformers < 5.x name
        checkpointing = getattr(inner, "is_gradient_checkpointing", False)
    if checkpointing and inner.training:
        return False  # transformers drops the KV cache under gradient checkpointing in training
    cfg = getattr(inner, "config", None)
    if getattr(cfg, "is_encoder_decoder", False):
        return False
    # a sliding-window cache keeps only the last W keys: pass 2's mask would not line up with it
    sliding = getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True)
    return not sliding and not any("sliding" in str(t) for t in (getattr(cfg, "layer_types", None) or ()))


@dataclass
class GoldPass:
    """What pass 1 leaves for pass 2.

    Attributes:
        gold_ids: the B gold continuations.
        gold_logps: (N0,) float32 log-probs of every gold token, example by example (with grad when the model
            has it).
        gold_counts: (B,) long, gold tokens per example.
        prefix_lens: (B,) long.
        hidden: (B, L, H) final hidden states of the ``[x | y_0 | pad]`` rows; position ``len(x) + m - 1``
            predicts token m of any continuation that agrees with the gold on its first m tokens.
        cache: the model's past key values over those rows (consumed by pass 2).
        cache_kwarg: the name the model takes them back under ("cache", or "past_key_values" before 5.x).
        cache_len: the padded length of those rows.
        gold_logits: B tensors ``(T_b, V)`` float32, detached (row t predicts gold token t), when requested.
    """

    gold_ids: list[list[int]]
    gold_logps: torch.Tensor
    gold_counts: torch.Tensor
    prefix_lens: torch.Tensor
    hidden: torch.Tensor
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
    h = hidden[sb.src_row, sb.src_pos]  # (N0, H)
    gold_logps = token_logps_from_hidden(model, h, sb.targets, chunk_size=chunk_size)
    logits = None
    if want_logits:
        logits = _gold_logits(model, h.detach(), sb.token_counts[:, 0].tolist(), chunk_size)
    return GoldPass(
        gold_ids=[list(g) for g in gold_ids],
        gold_logps=gold_logps,
        gold_counts=sb.token_counts[:, 0],
        prefix_lens=torch.tensor([len(p) for p in prefix_ids], dtype=torch.long, device=device),
        hidden=hidden,
        cache=output_cache(out),
        cache_kwarg=cache_kwarg(out),
        cache_len=sb.input_ids.shape[1],
        gold_logits=logits,
    )


def shared_with_gold(gold: list[int], negative: list[int]) -> int:
    """How many leading tokens ``negative`` has in common with ``gold`` (their log-probs are the gold's).

    >>> shared_with_gold([5, 6, 7, 8], [5, 6, 2])   # a truncation negative: gold[:2] + EOS
    2
    """
    m = 0
    for a, b in zip(gold, negative):
        if a != b:
            break
        m += 1
    return m


def two_pass_tokens(batch: CandidateBatch) -> tuple[int, int]:
    """(tokens the prefix-shared row runs, tokens the two passes run) for ``batch``: the second pass runs a
    negative only from its first token that differs from the gold, and never its last token."""
    one = two = 0
    for prefix, cands in zip(batch.prefix_ids, batch.candidate_ids):
        gold = cands[0]
        one += len(prefix) + sum(len(c) for c in cands)
        two += len(prefix) + len(gold) + sum(max(len(n) - shared_with_gold(gold, n) - 1, 0) for n in cands[1:])
    return one, two


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


def _negatives_mask(cache_limit, cache_len, segment_ids, dtype):
    """(B, 1, Lq, cache_len + Lq): query q sees cached key j < ``cache_limit[b, q]`` (the prefix and the gold
    tokens its negative shares, never the rest of the gold), and new keys of its own segment at or before it.
    Every query sees the prefix, so no row is fully masked."""
    B, Lq = segment_ids.shape
    device = segment_ids.device
    to_cache = torch.arange(cache_len, device=device)[None, None, :] < cache_limit[:, :, None]  # (B, Lq, cache_len)
    causal = torch.ones(Lq, Lq, dtype=torch.bool, device=device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    allowed = torch.cat([to_cache, causal[None] & same], dim=-1)[:, None]  # (B, 1, Lq, cache_len + Lq)
    if dtype is None:
        return allowed
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


@dataclass
class _NegativesPlan:
    """Where each negative token's log-prob comes from (:func:`negatives_pass`): ``gold_src``/``gold_index``
    the gold token it shares (index into ``GoldPass.gold_logps``, candidate column), ``p1_*`` its first
    differing token (pass 1's hidden state at (row, position)), ``p2_*`` the later tokens (this pass's query
    (row, position)); ``rows`` per example the (tokens, positions, segment ids, cache limits) this pass runs."""

    rows: list = field(default_factory=list)
    gold_src: list = field(default_factory=list)
    gold_index: list = field(default_factory=list)
    p1_row: list = field(default_factory=list)
    p1_pos: list = field(default_factory=list)
    p1_targets: list = field(default_factory=list)
    p1_index: list = field(default_factory=list)
    p2_row: list = field(default_factory=list)
    p2_pos: list = field(default_factory=list)
    p2_targets: list = field(default_factory=list)
    p2_index: list = field(default_factory=list)


def _plan_negatives(gp: GoldPass, negative_ids: list[list[list[int]]], K: int) -> _NegativesPlan:
    """Split every negative into its gold-shared start, its first differing token and the rest."""
    plan = _NegativesPlan()
    gold_start = [0] + torch.cumsum(gp.gold_counts, 0).tolist()[:-1]
    for b, row in enumerate(negative_ids):
        if len(row) != K:
            raise ValueError(f"example {b}: {len(row)} negatives, expected {K}")
        P, gold = int(gp.prefix_lens[b]), gp.gold_ids[b]
        toks, pos, seg, lim = [], [], [], []
        for i, neg in enumerate(row):
            n, c = len(neg), b * (K + 1) + i + 1  # candidate column i + 1
            m = shared_with_gold(gold, neg)
            plan.gold_src.extend(range(gold_start[b], gold_start[b] + m))
            plan.gold_index.extend([c] * m)
            if m == n:
                continue  # the negative is a prefix of the gold
            plan.p1_row.append(b)
            plan.p1_pos.append(P + m - 1)
            plan.p1_targets.append(neg[m])
            plan.p1_index.append(c)
            if n - m - 1 <= 0:
                continue
            start = len(toks)
            toks.extend(neg[m : n - 1])
            pos.extend(range(P + m, P + n - 1))
            seg.extend([i] * (n - m - 1))
            lim.extend([P + m] * (n - m - 1))
            plan.p2_row.extend([b] * (n - m - 1))
            plan.p2_pos.extend(range(start, start + n - m - 1))
            plan.p2_targets.extend(neg[m + 1 :])
            plan.p2_index.extend([c] * (n - m - 1))
        plan.rows.append((toks, pos, seg, lim))
    return plan


def _run_branches(model, gp: GoldPass, rows: list, pad_token_id: int) -> torch.Tensor:
    """This pass's forward over every example's negative branches on the gold pass's cache; the last hidden
    states (B, Lq, H)."""
    device = gp.prefix_lens.device
    B, Lq = len(rows), max(len(r[0]) for r in rows)
    input_ids = torch.full((B, Lq), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((B, Lq), dtype=torch.long)
    segment_ids = torch.full((B, Lq), -1, dtype=torch.long)
    cache_limit = gp.prefix_lens.cpu()[:, None].repeat(1, Lq)  # padding queries see the prefix only
    for b, (toks, pos, seg, lim) in enumerate(rows):
        n = len(toks)
        if n:
            input_ids[b, :n] = torch.tensor(toks)
            position_ids[b, :n] = torch.tensor(pos)
            segment_ids[b, :n] = torch.tensor(seg)
            cache_limit[b, :n] = torch.tensor(lim)
    impl = attn_implementation(model)
    # a FlexAttention BlockMask or a flash kernel cannot take this (query, cache + query) mask: use SDPA
    run_impl = impl if impl in ("sdpa", "eager") else "sdpa"
    mask = _negatives_mask(cache_limit.to(device), gp.cache_len, segment_ids.to(device),
                           model_dtype(model) if run_impl == "eager" else None)
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
    return out.hidden_states[-1]


def negatives_pass(
    model,
    gp: GoldPass,
    negative_ids: list[list[list[int]]],
    *,
    pad_token_id: int = 0,
    chunk_size: int = 1024,
    length_normalize: bool = False,
) -> SequenceLogps:
    """Pass 2: the K negatives of every example on the cache of :func:`gold_pass`; with the gold of ``gp``,
    the (B, K+1) log-probs of every candidate (column 0 the gold).

    A negative that agrees with the gold on its first m tokens takes those m log-probs from the gold, token m
    from pass 1's hidden state at ``len(x) + m - 1``, and only tokens m+1.. from this pass, which runs its
    tokens m..n-2 attending to the cached prefix and gold[:m]. A truncation negative (gold[:j] + EOS) thus
    runs no token here at all.

    Consumes ``gp.cache``.
    """
    if gp.consumed:
        raise RuntimeError("negatives_pass: this GoldPass's cache was already used")
    gp.consumed = True
    device = gp.prefix_lens.device
    B = len(negative_ids)
    K = len(negative_ids[0]) if B else 0
    counts = torch.tensor([[len(n) for n in row] for row in negative_ids], dtype=torch.long).reshape(B, K)
    plan = _plan_negatives(gp, negative_ids, K)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    # the gold's own tokens (column 0), then what each negative shares with it
    parts = [gp.gold_logps, gp.gold_logps[as_long(plan.gold_src)]]
    idx = [torch.repeat_interleave(torch.arange(B, device=device), gp.gold_counts) * (K + 1),
           as_long(plan.gold_index)]
    if plan.p1_row:
        h1 = gp.hidden[as_long(plan.p1_row), as_long(plan.p1_pos)]
        parts.append(token_logps_from_hidden(model, h1, as_long(plan.p1_targets), chunk_size=chunk_size))
        idx.append(as_long(plan.p1_index))
    if any(len(r[0]) for r in plan.rows):
        hidden = _run_branches(model, gp, plan.rows, pad_token_id)
        h2 = hidden[as_long(plan.p2_row), as_long(plan.p2_pos)]
        parts.append(token_logps_from_hidden(model, h2, as_long(plan.p2_targets), chunk_size=chunk_size))
        idx.append(as_long(plan.p2_index))
    gp.cache = None  # pass 2 appended to it: nothing else may read it
    counts = torch.cat([gp.gold_counts[:, None], counts.to(device)], dim=1)
    return sum_token_logps(torch.cat(parts), torch.cat(idx), counts, length_normalize)


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
    check_batch(batch)
    gp = gold_pass(model, batch.prefix_ids, [c[0] for c in batch.candidate_ids], pad_token_id=pad_token_id,
                   chunk_size=chunk_size)
    return negatives_pass(model, gp, [c[1:] for c in batch.candidate_ids], pad_token_id=pad_token_id,
                          chunk_size=chunk_size, length_normalize=length_normalize)
