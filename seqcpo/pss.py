"""PSS, parallel scheduled sampling: the exposure-bias baseline of docs/method.md ("Baselines").

Reference: Duckworth, Neelakantan, Goodrich, Kaiser, Bengio, "Parallel Scheduled Sampling", 2019
(arXiv 1906.04331). Scheduled sampling (Bengio et al. 2015) feeds the model its own tokens during training,
but one token at a time; the parallel version gets all of them from one teacher-forced pass:

1. a forward pass over ``prefix + gold`` (teacher forcing, no gradient) gives the model's prediction for
   every continuation position (the logits at position ``P + t - 1`` predict continuation token ``t``);
2. a mixed input keeps each continuation gold token with probability ``1 - p_model`` and otherwise puts the
   model's prediction there (a sample from the softmax, or the argmax); prefix tokens are always gold;
3. steps 1-2 repeat ``passes`` times, each pass predicting from the previous mixed input;
4. a last forward pass over the final mixed input, with gradient, is scored by token-mean cross-entropy
   against the **gold** continuation tokens (the targets never change, only the inputs do).

How we depart from / fill in the paper (docs/method.md leaves these open):

- ``passes`` counts mixing rounds, so a step runs ``passes`` no-grad forwards plus one forward with grad;
  ``passes = 1`` (the default) is Duckworth et al.'s two-pass setting. Each round draws a fresh mask.
- ``p_model = 1 - p_gold`` is warmed in linearly over ``pss_warmup_steps`` (:func:`pss_mix_probability`).
- With ``p_model = 0`` no prediction pass runs and the loss is exactly the MLE loss.
- With an empty prefix nothing predicts continuation token 0: it is never replaced and not scored
  (the same convention as :func:`seqcpo.evaluation.metrics.gold_perplexity`).
- Each example mixes with its own generator (:mod:`seqcpo.seeding`): its mask and its sampled tokens do not
  depend on the other examples of the batch, so the step does not depend on how the batch was split.
- ``reduction="sum"`` returns the summed token cross-entropy, for a trainer that divides by the number of
  target tokens of the whole optimizer step (:mod:`seqcpo.training.trainer`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from seqcpo.sampling import model_device, sample_rows
from seqcpo.padding import pad_batch
from seqcpo.seeding import Generators, per_example_generators
from seqcpo.types import Example


def pss_mix_probability(step: int, p_gold: float, warmup_steps: int) -> float:
    """Probability of replacing a gold continuation token by the model's token at ``step``.

    Ramps linearly from 0 at step 0 to ``1 - p_gold`` at ``warmup_steps`` and stays there;
    ``warmup_steps = 0`` means no warm-up (``1 - p_gold`` from the first step).

    >>> pss_mix_probability(0, 0.5, 10), pss_mix_probability(5, 0.5, 10), pss_mix_probability(50, 0.5, 10)
    (0.0, 0.25, 0.5)
    """
    if not 0.0 <= p_gold <= 1.0:
        raise ValueError(f"pss: p_gold must lie in [0, 1], got {p_gold}")
    if warmup_steps < 0:
        raise ValueError(f"pss: warmup_steps must be >= 0, got {warmup_steps}")
    full = 1.0 - p_gold
    if warmup_steps == 0:
        return full
    return full * min(1.0, max(0, step) / warmup_steps)


def _gold_batch(examples: Sequence[Example], pad_token_id: int):
    """Right-padded ``prefix + gold`` and the continuation positions that have a predictor.

    Returns input_ids (B, L) long, attention_mask (B, L) long, and ``scored`` (B, L) bool: True at positions
    j holding a continuation token predicted by position j - 1 (so j >= 1 and j >= P).
    """
    seqs = [list(ex.prefix_ids) + list(ex.continuation_ids) for ex in examples]
    input_ids, attention_mask = pad_batch(seqs, pad_token_id, min_width=1)  # (B, L) each
    scored = torch.zeros(input_ids.shape, dtype=torch.bool)  # (B, L)
    for b, (s, ex) in enumerate(zip(seqs, examples)):
        scored[b, max(1, len(ex.prefix_ids)) : len(s)] = True
    return input_ids, attention_mask, scored


def pss_loss(
    model: torch.nn.Module,
    examples: list[Example],
    *,
    p_model: float,
    passes: int,
    generator: Generators,
    pad_token_id: int,
    sample: bool = True,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> tuple[torch.Tensor, float]:
    """Parallel scheduled sampling loss (Duckworth et al. 2019) on a batch of (prefix, gold) examples.

    Args:
        model: a causal LM; ``model(input_ids=(B, L), attention_mask=(B, L)).logits`` is (B, L, V).
        examples: B examples; ``prefix_ids`` (length P_b) stay gold, ``continuation_ids`` (T_b) are mixed.
        p_model: probability that a continuation token of the input is the model's (``1 - p_gold``; see
            :func:`pss_mix_probability`).
        passes: mixing rounds (>= 1), each a no-grad forward over the previous input; the final forward over
            the last mixed input is the only one with gradient.
        generator: the only source of randomness (the masks and the samples): one generator per example (a
            list; example b's mask and samples come from ``generator[b]``), or one for the batch.
        pad_token_id: fills the right padding (masked out by the attention mask).
        sample: replace with a sample from ``softmax(logits / temperature)`` (default) or the argmax.
        temperature: sampling temperature.
        reduction: "mean" (token mean over the batch) or "sum" (summed over the scored tokens).

    Returns:
        ``(loss, mix_fraction)``: the cross-entropy of the gold continuation tokens given the final mixed input
        (float32 scalar with gradient; token mean or sum per ``reduction``), and the fraction of scored
        continuation tokens that the final mask replaced by a model token (about ``p_model``; a replaced token
        may equal the gold).
    """
    if not 0.0 <= p_model <= 1.0:
        raise ValueError(f"pss: p_model must lie in [0, 1], got {p_model}")
    if passes < 1:
        raise ValueError(f"pss: passes must be >= 1, got {passes}")
    if sample and temperature <= 0:
        raise ValueError(f"pss: temperature must be > 0 when sampling, got {temperature}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"pss: reduction must be 'mean' or 'sum', got {reduction!r}")
    gens = per_example_generators(generator, len(examples))
    device = model_device(model)
    gold, attention_mask, scored = _gold_batch(examples, pad_token_id)  # (B, L) each, on CPU
    per_row = scored.sum(dim=1).tolist()  # scored tokens of each example; its rows are contiguous in (N, V)
    n_scored = int(sum(per_row))
    gold_d, attention_d, scored_d = gold.to(device), attention_mask.to(device), scored.to(device)

    mixed = gold_d
    replaced = torch.zeros_like(scored)  # (B, L) the final round's mask
    if p_model > 0 and n_scored > 0:
        for _ in range(passes):
            with torch.no_grad():
                logits = model(input_ids=mixed, attention_mask=attention_d).logits  # (B, L, V)
                pred_logits = logits[:, :-1][scored_d[:, 1:]].float()  # (N, V): position j-1 predicts token j
                if sample:
                    probs = torch.softmax(pred_logits / temperature, dim=-1)
                    pred = sample_rows(probs, gens, per_row)  # (N,) example b's rows from gens[b]
                else:
                    pred = pred_logits.argmax(-1)  # (N,)
            keep_draws = torch.cat([torch.rand(n, generator=g) for g, n in zip(gens, per_row)])  # (N,)
            replaced = torch.zeros_like(scored)  # (B, L)
            replaced[scored] = keep_draws < p_model
            tokens = gold_d.clone()
            tokens[scored_d] = pred.to(device)  # the model's token at every scored position
            mixed = torch.where(replaced.to(device), tokens, gold_d)  # prefix and kept tokens gold

    logits = model(input_ids=mixed, attention_mask=attention_d).logits  # (B, L, V), with grad
    picked = logits[:, :-1][scored_d[:, 1:]].float()  # (N, V)
    targets = gold_d[:, 1:][scored_d[:, 1:]]  # (N,) always the gold
    if n_scored == 0:
        return picked.sum() * 0.0, 0.0
    loss = F.cross_entropy(picked, targets, reduction=reduction)
    return loss, float(replaced.sum()) / n_scored
