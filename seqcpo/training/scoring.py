"""One scoring step: the negatives of a batch of examples and the reference's log-probs of gold + negatives.

Called by the trainer at every step and by ``seqcpo negatives`` (:mod:`seqcpo.training.offline`) for every
chunk of a shard, so both make the same negatives with the same reference log-probs (docs/method.md,
"Negatives", and "The objective" for the frozen reference).

MN negatives are drawn from the logits of a teacher-forced pass over ``x + y_0`` (docs/method.md, "Negatives",
row MN). When the model that makes them is scored in two passes (:mod:`seqcpo.two_pass`), its gold-branch pass
gives both its gold log-probs and those logits, so MN costs no forward pass of its own. :func:`mn_source` is
the one rule for when that pass is reused, and whose it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from seqcpo.batching import candidate_batch, negatives_from_offline
from seqcpo.negatives import uses_gold_logits
from seqcpo.reference import AdapterDisabledReference, FrozenCopyReference
from seqcpo.token_logps import SequenceLogps
from seqcpo.two_pass import gold_pass, negatives_pass
from seqcpo.types import CandidateBatch, Example, Negatives

#: ``make(examples, gold_logits=None) -> Negatives``: K negatives per example, each example's draws seeded.
MakeNegatives = Callable[..., Negatives]


@dataclass
class Scored:
    """What a scoring step hands the loss.

    Attributes:
        batch: gold + negatives, (B, K+1) candidates (column 0 the gold).
        negatives: the K negatives of every example (None for fixed negatives read from disk).
        ref_logps: (B, K+1) float32 reference log-probs, no gradient.
        policy: the policy's (B, K+1) log-probs when its own gold-branch pass was reused (``mn_source ==
            "policy"``); None otherwise (the caller scores the policy on ``batch``).
    """

    batch: CandidateBatch
    negatives: Negatives | None
    ref_logps: torch.Tensor
    policy: SequenceLogps | None = None


def mn_source(
    generator,
    *,
    layout: str,
    negatives_model: str = "reference",
    reference=None,
    head_in_forward: bool = False,
    policy_two_pass: bool = False,
) -> str | None:
    """Whose gold-branch pass MN negatives are drawn from: "reference", "policy", or None (MN, if any, runs
    its own forward pass).

    The pass is reused when the generator takes gold logits (MN, alone or in a mixture), the layout may run in
    two passes (``auto`` or ``two_pass``) and the LM head runs outside the model's forward (not under FSDP /
    ZeRO-3). The reference's pass needs a reference that is a model (frozen copy, adapter disabled); the
    policy's (``negatives_model: policy``) needs ``policy_two_pass``: the policy as it stands makes the
    negatives (refresh every step), runs without gradient checkpointing and supports a KV cache in training.
    """
    if generator is None or not uses_gold_logits(generator) or layout not in ("auto", "two_pass") or head_in_forward:
        return None
    if negatives_model == "reference":
        return "reference" if isinstance(reference, (FrozenCopyReference, AdapterDisabledReference)) else None
    return "policy" if policy_two_pass else None


def score_examples(
    examples: Sequence[Example],
    make_negatives: MakeNegatives | None,
    reference,
    *,
    source: str | None = None,
    offline_rows: list[dict[str, Any]] | None = None,
    policy=None,
    policy_options: dict[str, Any] | None = None,
) -> Scored:
    """Negatives + reference log-probs for ``examples``.

    Args:
        examples: the B gold examples.
        make_negatives: ``make(examples, gold_logits=None)``; unused with ``offline_rows``.
        reference: a :mod:`seqcpo.reference` object (``logps``, and ``gold_pass`` / ``finish`` for a model).
        source: :func:`mn_source`'s answer.
        offline_rows: fixed negatives read from disk (``seqcpo negatives`` rows), one per example.
        policy: with ``source == "policy"``, the policy model; its gold-branch pass runs with gradient.
        policy_options: ``pad_token_id``, ``chunk_size``, ``length_normalize`` for the policy's two passes.
    """
    examples = list(examples)
    if offline_rows is not None:
        negatives, ref_pre = negatives_from_offline(offline_rows)
        batch = candidate_batch(examples, negatives, ref_pre)
        return Scored(batch, None, reference.logps(batch))
    prefixes = [e.prefix_ids for e in examples]
    golds = [e.continuation_ids for e in examples]
    if source == "reference":
        # one reference pass over x + y_0 gives the reference's gold log-probs and MN's logits
        rgp = reference.gold_pass(prefixes, golds, want_logits=True)
        negatives = make_negatives(examples, gold_logits=rgp.gold_logits)
        return Scored(candidate_batch(examples, negatives), negatives, reference.finish(rgp, negatives.ids))
    if source == "policy":
        # the policy's own gold-branch pass (with gradient) gives its gold log-probs and MN's logits
        opts = dict(policy_options or {})
        length_normalize = opts.pop("length_normalize", False)
        gp = gold_pass(policy, prefixes, golds, want_logits=True, **opts)
        negatives = make_negatives(examples, gold_logits=gp.gold_logits)
        out = negatives_pass(policy, gp, negatives.ids, length_normalize=length_normalize, **opts)
        batch = candidate_batch(examples, negatives)
        return Scored(batch, negatives, reference.logps(batch), policy=out)
    negatives = make_negatives(examples)
    batch = candidate_batch(examples, negatives)
    return Scored(batch, negatives, reference.logps(batch))


def preference_term(cfg, logps: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, batch: CandidateBatch,
                    examples: Sequence[Example]) -> torch.Tensor:
    """The objective's per-example preference loss (B,) for a SeqCPOConfig ``cfg``; the list losses get their
    labels / targets from the column order, the negatives' sources and the data's scores
    (:func:`seqcpo.negatives.data.candidate_labels`)."""
    from seqcpo.losses import LIST_OBJECTIVES, preference_loss_per_example
    from seqcpo.negatives.data import candidate_labels

    labels = targets = None
    if cfg.objective in LIST_OBJECTIVES:
        sources = batch.sources or [["synthetic"] * (batch.num_candidates - 1) for _ in examples]
        lab, tgt = candidate_labels(examples, sources, cfg.ranked)
        labels = torch.tensor(lab, dtype=torch.float32, device=logps.device)
        targets = torch.tensor(tgt, dtype=torch.float32, device=logps.device)
    return preference_loss_per_example(cfg.objective, logps, ref, cfg.beta, mask=mask, labels=labels,
                                       targets=targets, margin=cfg.target_margin, alpha=cfg.infonca_alpha)
