"""Hidden states -> token log-probs -> sequence log-probs: the end of every log-prob layout.

:func:`token_logps_from_hidden` runs the LM head and the log-softmax on the hidden states that predict
continuation tokens only, in chunks (no (rows x length x vocabulary) float32 tensor is ever built);
:func:`sum_token_logps` adds the token log-probs of each candidate into ``logp(y_i | x)`` (docs/method.md, "The
objective"), as a :class:`SequenceLogps`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from seqcpo.hf_model import unwrap_model


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


def sum_token_logps(flat_logps: torch.Tensor, cand_index: torch.Tensor, token_counts: torch.Tensor,
                    length_normalize: bool) -> SequenceLogps:
    """Token log-probs (N,) summed into their candidates ``cand_index`` (N,) = b * (K+1) + i -> (B, K+1)."""
    B, k1 = token_counts.shape
    summed = torch.zeros(B * k1, dtype=torch.float32, device=flat_logps.device)
    summed = summed.index_add(0, cand_index, flat_logps).view(B, k1)
    logps = summed / token_counts.clamp(min=1) if length_normalize else summed
    return SequenceLogps(logps=logps, token_counts=token_counts, summed=summed)


class ChunkedLinearLogps(torch.autograd.Function):
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


def final_logit_softcap(model) -> float | None:
    """The model's ``final_logit_softcapping`` (Gemma-style ``tanh(logits / c) * c``), or None."""
    cfg = getattr(unwrap_model(model), "config", None)
    return getattr(cfg, "final_logit_softcapping", None) if cfg is not None else None


def token_logps_from_hidden(model, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Log-probs of ``targets`` (N,) given final hidden states ``hidden`` (N, H), through the model's LM head.

    A plain ``nn.Linear`` head goes through the recomputing chunked kernel; any other head (a soft-capped
    one, a wrapped one) through ordinary autograd, still in chunks.
    """
    inner = unwrap_model(model)
    head = inner.get_output_embeddings()
    softcap = final_logit_softcap(inner)
    if isinstance(head, torch.nn.Linear) and type(head) is torch.nn.Linear and softcap is None:
        return ChunkedLinearLogps.apply(hidden, head.weight, head.bias, targets, chunk_size)
    pieces = []
    for s in range(0, hidden.shape[0], chunk_size):
        logits = head(hidden[s : s + chunk_size]).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        pieces.append(logits.gather(1, targets[s : s + chunk_size, None]).squeeze(1) - torch.logsumexp(logits, -1))
    if not pieces:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces)
