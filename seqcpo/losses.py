"""The objectives of docs/method.md, as small pure functions on log-probabilities.

Notation (docs/method.md, "The objective"): for an example with gold continuation ``y_0`` and negatives
``y_1 .. y_K``, ``logp(y|x)`` is the summed continuation log-probability and the implicit reward is

    s_i = beta * (logp_policy(y_i|x) - logp_ref(y_i|x))

Every function here computes in float32 whatever the input dtype (bf16 log-probs are upcast first), and
only through ``logsumexp`` / ``logsigmoid``, so no large number is ever exponentiated.

Columns can be masked out (a negative that could not be made different from the gold is "dropped",
see ``seqcpo.negatives``): a masked column takes no part in any softmax or ranking term. Column 0, the
gold, is never masked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# A finite stand-in for -inf: exp(_NEG - x) is exactly 0 in float32, and unlike -inf it never turns a
# masked-out term into NaN in the backward pass.
_NEG = -1.0e30


def _rewards(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """s = beta * (policy - ref), float32, shape (B, K+1)."""
    if policy_logps.shape != ref_logps.shape:
        raise ValueError(
            f"policy_logps {tuple(policy_logps.shape)} and ref_logps {tuple(ref_logps.shape)} must have the same shape (B, K+1)"
        )
    if policy_logps.dim() != 2 or policy_logps.shape[1] < 2:
        raise ValueError(
            f"log-probs must have shape (B, K+1) with K >= 1 (column 0 the gold); got {tuple(policy_logps.shape)}"
        )
    return beta * (policy_logps.float() - ref_logps.float().detach())


def _check_mask(mask: torch.Tensor | None, shape: torch.Size, device) -> torch.Tensor:
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    mask = mask.to(device=device, dtype=torch.bool)
    if mask.shape != shape:
        raise ValueError(f"mask {tuple(mask.shape)} must have the log-probs' shape {tuple(shape)}")
    if not bool(mask[:, 0].all()):
        raise ValueError("mask[:, 0] (the gold column) must be True for every example")
    return mask


def cpo_loss_per_example(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    beta: float,
    ranked: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-example CPO loss, shape (B,). See :func:`cpo_loss`."""
    s = _rewards(policy_logps, ref_logps, beta)  # (B, K+1)
    mask = _check_mask(mask, s.shape, s.device)
    s_masked = s.masked_fill(~mask, _NEG)
    if not ranked:
        # L_cpo = -[ s_0 - logsumexp_{i=0..K} s_i ]
        return -(s[:, 0] - torch.logsumexp(s_masked, dim=1))
    # L_ranked = -sum_{k=0..K-1} [ s_k - logsumexp_{j=k..K} s_j ]; tail_lse[:, k] = logsumexp_{j>=k} s_j
    tail_lse = torch.logcumsumexp(s_masked.flip(1), dim=1).flip(1)  # (B, K+1)
    terms = torch.where(mask, s - tail_lse, torch.zeros_like(s))
    # The last factor (k = K) is identically zero when column K is valid; dropping it changes nothing.
    return -terms[:, :-1].sum(dim=1)


def cpo_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    beta: float,
    ranked: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Contrastive Preference Optimization loss, batch mean (docs/method.md, "The objective").

    Args:
        policy_logps: (B, K+1) summed continuation log-probs under the policy; column 0 is the gold
            continuation, columns 1..K the negatives (best first when ``ranked``).
        ref_logps: (B, K+1) the same under the frozen reference (no gradient flows into it).
        beta: reward scale.
        ranked: False for the softmax form ``-[s_0 - logsumexp_i s_i]``; True for the Plackett-Luce form
            ``-sum_{k<K} [s_k - logsumexp_{j>=k} s_j]`` over the ranking gold > y_1 > ... > y_K.
        mask: optional (B, K+1) bool, False for dropped negatives.

    Returns:
        A float32 scalar. With K = 1 both forms equal :func:`dpo_loss`.
    """
    return cpo_loss_per_example(policy_logps, ref_logps, beta, ranked=ranked, mask=mask).mean()


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DPO loss ``-log sigmoid(s_chosen - s_rejected)``, batch mean; all inputs of shape (B,).

    Equals ``cpo_loss`` with K = 1 (docs/method.md: "With K = 1 this is exactly the DPO loss").
    """
    chosen = beta * (policy_chosen_logps.float() - ref_chosen_logps.float().detach())
    rejected = beta * (policy_rejected_logps.float() - ref_rejected_logps.float().detach())
    return -F.logsigmoid(chosen - rejected).mean()


def mle_loss(gold_logps: torch.Tensor, gold_token_counts: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over the gold continuation tokens, token-mean over the batch.

    Args:
        gold_logps: (B,) summed (not length-normalised) log-probs of each gold continuation.
        gold_token_counts: (B,) number of continuation tokens of each gold.

    Returns:
        ``-sum_b gold_logps[b] / sum_b gold_token_counts[b]`` (float32 scalar), the same number as the
        usual token-mean cross-entropy with the prefix tokens masked out of the labels.
    """
    total = gold_token_counts.float().sum().clamp(min=1.0)
    return -gold_logps.float().sum() / total



def step_loss(
    mle_sum: torch.Tensor,
    cpo_sum: torch.Tensor | None = None,
    *,
    tokens: int,
    examples: int,
    mle_weight: float = 1.0,
    cpo_lambda: float = 1.0,
    processes: int = 1,
) -> torch.Tensor:
    """One micro-batch's share of an optimizer step's loss (docs/method.md, "The objective").

    ``L = mle_weight * mle_sum / tokens + cpo_lambda * cpo_sum / examples``, times ``processes``:

    Args:
        mle_sum: scalar, the SUM of this micro-batch's gold-token losses (MLE or PSS negative log-likelihood).
        cpo_sum: scalar, the SUM of its per-example CPO / DPO losses; None for MLE / PSS alone.
        tokens: gold target tokens of the whole step (every micro-batch, every process); 0 counts as 1.
        examples: examples of the whole step; 0 counts as 1.
        mle_weight, cpo_lambda: the weights of the two terms.
        processes: the number of processes, whose gradients DDP / FSDP / DeepSpeed average: multiplying by it
            turns that average back into the sum, so the step's gradient is the gradient of the sum over its
            micro-batches and processes of these shares, whatever the split.

    Returns:
        A scalar in ``mle_sum``'s dtype. Summed over a step's micro-batches and processes it is the token-mean
        MLE plus lambda times the example-mean CPO of the whole step.
    """
    loss = mle_weight * mle_sum / max(int(tokens), 1)
    if cpo_sum is not None:
        loss = loss + cpo_lambda * cpo_sum / max(int(examples), 1)
    return loss * processes


#: the names :func:`preference_metrics` and :func:`preference_metric_sums` return, in their order
PREFERENCE_METRICS = (
    "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "rewards/strongest_rejected",
    "rewards/gold_top1", "logps/chosen", "logps/rejected",
)


@torch.no_grad()
def preference_metric_sums(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    beta: float,
    mask: torch.Tensor | None = None,
) -> dict[str, tuple[float, float]]:
    """The metrics of :func:`preference_metrics` as ``name -> (sum, count)``, so that a trainer can pool them
    over the micro-batches and processes of one step: the step's value is ``sum of sums / sum of counts`` (0.0
    for a zero count), the same number one batch holding all the step's examples would give.

    Counts: examples for ``rewards/chosen``, ``rewards/gold_top1``, ``logps/chosen``; valid negatives for
    ``rewards/rejected``, ``rewards/accuracies``, ``logps/rejected``; examples with a valid negative for
    ``rewards/margins`` and ``rewards/strongest_rejected``.
    """
    s = _rewards(policy_logps, ref_logps, beta)
    mask = _check_mask(mask, s.shape, s.device)
    neg_mask = mask[:, 1:]
    neg = s[:, 1:]
    n_neg = neg_mask.sum(dim=1).clamp(min=1)
    neg_mean = (neg * neg_mask).sum(dim=1) / n_neg
    strongest = neg.masked_fill(~neg_mask, _NEG).max(dim=1).values
    has_neg = neg_mask.any(dim=1)
    wins = (s[:, :1] > neg) & neg_mask
    pol = policy_logps.float()
    zero = torch.zeros((), device=s.device)
    B, valid, with_neg = float(s.shape[0]), neg_mask.sum().float(), has_neg.sum().float()
    pairs = {
        "rewards/chosen": (s[:, 0].sum(), B),
        "rewards/rejected": ((neg * neg_mask).sum(), valid),
        "rewards/margins": (torch.where(has_neg, s[:, 0] - neg_mean, zero).sum(), with_neg),
        "rewards/accuracies": (wins.sum().float(), valid),
        "rewards/strongest_rejected": (torch.where(has_neg, strongest, zero).sum(), with_neg),
        "rewards/gold_top1": (((s[:, 0] > strongest) | ~has_neg).float().sum(), B),
        "logps/chosen": (pol[:, 0].sum(), B),
        "logps/rejected": ((pol[:, 1:] * neg_mask).sum(), valid),
    }
    flat = torch.stack([torch.as_tensor(x, dtype=torch.float64, device=s.device) for pair in pairs.values() for x in pair])
    values = flat.tolist()  # one device sync for all
    assert tuple(pairs) == PREFERENCE_METRICS
    return {name: (values[2 * i], values[2 * i + 1]) for i, name in enumerate(pairs)}


def preference_metrics(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    beta: float,
    mask: torch.Tensor | None = None,
) -> dict[str, float]:
    """Metrics logged beside the loss, with TRL's names plus K-aware ones.

    - ``rewards/chosen``: mean gold reward s_0.
    - ``rewards/rejected``: mean reward over the valid negatives.
    - ``rewards/margins``: mean over examples of s_0 minus the example's mean negative reward.
    - ``rewards/accuracies``: fraction of (example, valid negative) pairs with s_0 > s_k.
    - ``rewards/strongest_rejected``: mean over examples of the largest negative reward.
    - ``rewards/gold_top1``: fraction of examples whose gold outranks every valid negative.
    - ``logps/chosen``, ``logps/rejected``: mean policy log-prob of the gold and of the valid negatives.

    Means over examples count only examples with a valid negative where a negative is involved (margins,
    strongest); a mean over nothing is 0.0. See :func:`preference_metric_sums` for the pooled form.
    """
    return {k: (total / count if count else 0.0) for k, (total, count) in preference_metric_sums(
        policy_logps, ref_logps, beta, mask=mask).items()}
