"""Sequence log-probabilities ``logp(y_i | x)`` of K+1 continuations per prefix (PAPER.md, "The objective").

Two layouts compute the same numbers:

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

Both return :class:`SequenceLogps`: ``logps`` (B, K+1), summed over each continuation's tokens
(divided by the token count when ``length_normalize``), and ``token_counts`` (B, K+1).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from seqcpo.padding import pad_batch
from seqcpo.types import CandidateBatch


@dataclass
class SequenceLogps:
    """Summed log-probs per candidate.

    Attributes:
        logps: (B, K+1) float32; summed, or token-mean when computed with ``length_normalize``.
        token_counts: (B, K+1) long, continuation tokens per candidate.
        summed: (B, K+1) float32, always the summed log-probs (the MLE term reads column 0).
    """

    logps: torch.Tensor
    token_counts: torch.Tensor
    summed: torch.Tensor


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


def _check_batch(batch: CandidateBatch) -> None:
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
    _check_batch(batch)
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


class _ChunkedLinearLogps(torch.autograd.Function):
    """``log_softmax(h @ W.T + bias)[target]`` per row, in chunks, recomputing logits in backward.

    h: (N, H), weight: (V, H), bias: (V,) or None, targets: (N,) -> (N,) float32. Peak extra memory is one
    (chunk, V) float32 block in both passes; autograd keeps nothing of size N x V.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_size):
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk_size):
            logits = F.linear(h[s : s + chunk_size], weight, bias).float()  # (c, V)
            lse = torch.logsumexp(logits, dim=-1)
            out[s : s + chunk_size] = logits.gather(1, targets[s : s + chunk_size, None]).squeeze(1) - lse
        ctx.save_for_backward(h, weight, bias, targets)
        ctx.chunk_size = chunk_size
        # recompute the logits in backward under the same autocast state as here (bf16 training)
        dev = h.device.type
        ctx.autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev), dev)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, bias, targets = ctx.saved_tensors
        cs = ctx.chunk_size
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if (need_b and bias is not None) else None
        for s in range(0, h.shape[0], cs):
            hc = h[s : s + cs]
            enabled, ac_dtype, dev = ctx.autocast
            with torch.autocast(device_type=dev, dtype=ac_dtype, enabled=enabled):
                logits = F.linear(hc, weight, bias).float()
            # d logp[t] / d logits = onehot(t) - softmax
            g = -torch.softmax(logits, dim=-1)
            g.scatter_add_(1, targets[s : s + cs, None], torch.ones_like(g[:, :1]))
            g.mul_(grad_out[s : s + cs, None].float())
            if need_h:
                grad_h[s : s + cs] = (g.to(weight.dtype) @ weight).to(h.dtype)
            if need_w:
                grad_w += g.t() @ hc.float()
            if grad_b is not None:
                grad_b += g.sum(0)
        return (
            grad_h,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
            None,
            None,
        )


def unwrap_model(model):
    """The model inside DDP/FSDP-style wrappers (``.module``), for reading its config and LM head."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _final_logit_softcap(model) -> float | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "final_logit_softcapping", None) if cfg is not None else None


def token_logps_from_hidden(model, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Log-probs of ``targets`` (N,) given final hidden states ``hidden`` (N, H), through the model's LM head.

    A plain ``nn.Linear`` head goes through the recomputing chunked kernel; any other head (a soft-capped
    one, a wrapped one) through ordinary autograd, still in chunks.
    """
    inner = unwrap_model(model)
    head = inner.get_output_embeddings()
    softcap = _final_logit_softcap(inner)
    if isinstance(head, torch.nn.Linear) and type(head) is torch.nn.Linear and softcap is None:
        return _ChunkedLinearLogps.apply(hidden, head.weight, head.bias, targets, chunk_size)
    pieces = []
    for s in range(0, hidden.shape[0], chunk_size):
        logits = head(hidden[s : s + chunk_size]).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        pieces.append(logits.gather(1, targets[s : s + chunk_size, None]).squeeze(1) - torch.logsumexp(logits, -1))
    if not pieces:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces)


def _attn_implementation(model) -> str:
    cfg = getattr(unwrap_model(model), "config", None)
    return getattr(cfg, "_attn_implementation", None) or "eager"


def _model_dtype(model) -> torch.dtype:
    return next(p for p in model.parameters()).dtype


_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, stacklevel=3)


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


def _needs_grad(model) -> bool:
    return torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())


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
    impl = _attn_implementation(model)
    if sb.single_segment:
        return (sb.segment_ids >= 0).long(), None
    if impl == "flex_attention":
        if sb.input_ids.device.type == "cpu" and _needs_grad(model):
            _warn_once("FlexAttention has no backward on CPU in this torch: running SDPA with a dense mask instead")
            return sb.attention_mask(None), "sdpa"
        return sb.block_mask(), None
    if impl == "sdpa":
        return sb.attention_mask(None), None
    if impl == "eager":
        return sb.attention_mask(_model_dtype(model)), None
    if impl.startswith("flash_attention") or impl.startswith("paged"):
        _warn_once(f"attn_implementation={impl!r} takes no prefix-shared 4-D mask: running SDPA with a dense mask instead")
        return sb.attention_mask(None), "sdpa"
    return sb.attention_mask(None), None  # kernels registered by the user: assume they take a boolean mask


def cache_kwarg(out) -> str:
    """Name of the KV-cache argument, read off a forward's output (so wrapped models with a bare
    ``forward(*args, **kwargs)`` work too): ``cache`` in transformers 5.x, ``past_key_values`` before."""
    return "cache" if hasattr(out, "cache") else "past_key_values"


def output_cache(out):
    """The KV cache a forward with ``use_cache=True`` returned."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _final_hidden(model, input_ids, attention_mask, position_ids) -> torch.Tensor:
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


def sum_token_logps(flat_logps: torch.Tensor, cand_index: torch.Tensor, token_counts: torch.Tensor,
                    length_normalize: bool) -> SequenceLogps:
    """Token log-probs (N,) summed into their candidates ``cand_index`` (N,) = b * (K+1) + i -> (B, K+1)."""
    B, k1 = token_counts.shape
    summed = torch.zeros(B * k1, dtype=torch.float32, device=flat_logps.device)
    summed = summed.index_add(0, cand_index, flat_logps).view(B, k1)
    logps = summed / token_counts.clamp(min=1) if length_normalize else summed
    return SequenceLogps(logps=logps, token_counts=token_counts, summed=summed)


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
        hidden = _final_hidden(model, sb.input_ids, mask, sb.position_ids)  # (B, L, H)
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
    _check_batch(batch)
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


AUTO_TWO_PASS_SAVING = 0.15


def choose_layout(model, batch: CandidateBatch, *, head_in_forward: bool = False) -> str:
    """"two_pass" when it runs at least ``AUTO_TWO_PASS_SAVING`` fewer tokens than the prefix-shared row (its
    negatives share long beginnings with the gold, as truncation negatives do) and the model can run it
    (a KV cache in training, the head outside the forward); else "shared"."""
    from seqcpo.two_pass import two_pass_supported, two_pass_tokens

    if head_in_forward or batch.num_candidates < 2 or not two_pass_supported(model):
        return "shared"
    one, two = two_pass_tokens(batch)
    return "two_pass" if two <= (1.0 - AUTO_TWO_PASS_SAVING) * one else "shared"


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
    """``logp(y_i|x)`` for every candidate of every example, (B, K+1); ``layout`` is "shared", "two_pass"
    (:mod:`seqcpo.two_pass`), "naive", or "auto" (:func:`choose_layout`, per batch). All give the same numbers."""
    if layout == "auto":
        layout = choose_layout(model, batch, head_in_forward=head_in_forward)
    if layout == "shared":
        return shared_sequence_logps(
            model, batch, pad_token_id=pad_token_id, length_normalize=length_normalize, chunk_size=chunk_size,
            head_in_forward=head_in_forward,
        )
    if layout == "naive":
        return naive_sequence_logps(model, batch, pad_token_id=pad_token_id, length_normalize=length_normalize)
    if layout == "two_pass":
        from seqcpo.two_pass import two_pass_sequence_logps

        if head_in_forward:
            raise ValueError("layout 'two_pass' applies the LM head outside the model's forward: use 'shared' with sharded weights")
        return two_pass_sequence_logps(
            model, batch, pad_token_id=pad_token_id, length_normalize=length_normalize, chunk_size=chunk_size
        )
    raise ValueError(f"layout must be 'shared', 'two_pass' or 'naive', got {layout!r}")
