"""The training step's loss on document rows (``task: document``): MLE on every row token, CPO at anchors.

For a micro-batch of rows (chunks of documents, :mod:`seqcpo.data.documents`):

1. each row's anchors are drawn from its own generator (seed, row id, epoch, "anchors"), the row id naming
   (document, chunk) (:func:`seqcpo.document_rows.choose_anchors`);
2. every anchor becomes a window (prefix = the row up to it, gold = its next ``continuation_tokens``) with the id
   ``"<row id>@<anchor>"``, and the configured generators make its K negatives from that id's generator
   (:meth:`SeqCPOTrainer.make_negatives`): TN, MN, AN and their mixtures exactly as for windows, BN from the
   other anchors' golds of the micro-batch. MN draws from the logits of one pass over the rows of its model
   (the reference by default), no window pass per anchor;
3. the policy runs the rows with every anchor's negatives as branches in one forward pass
   (:func:`seqcpo.document_rows.document_logps`): the MLE term and the golds' log-probs come from the rows, the
   negatives' from their branches; the reference runs the same layout without gradient (frozen copy, bf16
   copy or the LoRA policy with its adapter off);
4. ``L = mle_weight * (-sum of row token log-probs) / step tokens + lambda * sum of anchor CPO losses / step
   anchors``, each multiplied by the number of processes (see :mod:`seqcpo.training.trainer`): the step's
   tokens are its rows' predicted tokens and its anchors are counted by
   :func:`seqcpo.document_rows.anchor_count` before any is drawn, so a step does not depend on its split.
"""

from __future__ import annotations

from typing import Any

import torch

from seqcpo.batching import StepCounts
from seqcpo.document_rows import (
    anchor_count,
    anchor_examples,
    anchor_gold_logits,
    build_document_layout,
    choose_anchors,
    document_logps,
)
from seqcpo.losses import cpo_loss_per_example, preference_metric_sums
from seqcpo.negatives import uses_gold_logits


def anchor_counter(cfg):
    """``n -> anchors of a row of n tokens`` under ``cfg`` (for the step's counts)."""
    return lambda n: anchor_count(n, cfg.continuation_tokens, cfg.anchors_per_row, cfg.anchor_stride)


def document_loss(trainer, model, inputs: dict[str, Any], num_items_in_batch=None):
    """The micro-batch's share of the step's loss on document rows, and its metric sums ``name -> (sum,
    count)``. ``num_items_in_batch``: the step's :class:`~seqcpo.batching.StepCounts` (tokens, anchors) in
    training; without it the loss is this micro-batch's own mean."""
    cfg = trainer.cfg
    training = model.training
    C = cfg.continuation_tokens
    rows = [list(p) + list(c) for p, c in zip(inputs["prefix_ids"], inputs["continuation_ids"])]
    ids = [str(i) for i in inputs["ids"]]
    epochs = inputs.get("epochs")
    rngs = trainer.example_rngs(ids, training, "anchors", epochs)
    anchors = [choose_anchors(len(r), C, cfg.anchors_per_row, cfg.anchor_stride, g) for r, g in zip(rows, rngs)]
    examples = anchor_examples(rows, ids, anchors, C)
    anchor_epochs = None if epochs is None else [e for e, a in zip(epochs, anchors) for _ in a]
    device = next(model.parameters()).device
    negatives = None
    if examples:
        gold_logits = None
        if uses_gold_logits(trainer.generator):
            gold_logits = _gold_logits(trainer, rows, anchors, C, device)
        negatives = trainer.make_negatives(examples, training, gold_logits=gold_logits, epochs=anchor_epochs)
    layout = build_document_layout(rows, anchors, negatives.ids if negatives else None, C, device=device)
    opts = dict(length_normalize=cfg.length_normalize, chunk_size=cfg.logits_chunk_size)
    out = document_logps(model, layout, **opts)
    n_tokens, n_anchors = int(layout.row_counts.sum()), len(examples)
    if isinstance(num_items_in_batch, StepCounts):
        scale = trainer.accelerator.num_processes
        tokens_norm, anchors_norm = max(num_items_in_batch.tokens, 1), max(num_items_in_batch.examples, 1)
    else:
        scale, tokens_norm, anchors_norm = 1, max(n_tokens, 1), max(n_anchors, 1)
    nll = -out.row_summed.sum()
    sums: dict[str, tuple[float, float]] = {"loss/mle": (nll.item(), n_tokens)}
    loss = cfg.mle_weight * nll / tokens_norm
    if examples:
        ref = _reference_logps(trainer, layout, opts).to(out.anchors.logps.device)
        mask = torch.tensor([[True] + list(v) for v in negatives.valid], dtype=torch.bool, device=ref.device)
        cpo = cpo_loss_per_example(out.anchors.logps, ref, cfg.beta, ranked=cfg.ranked, mask=mask).sum()
        loss = loss + cfg.cpo_lambda * cpo / anchors_norm
        sums.update(preference_metric_sums(out.anchors.logps.detach(), ref, cfg.beta, mask=mask))
        sums["loss/cpo"] = (cpo.item(), n_anchors)
        n_neg = mask[:, 1:].numel()
        sums["negatives/dropped"] = (float(n_neg - int(mask[:, 1:].sum())), n_neg)
    return loss * scale, sums


def _gold_logits(trainer, rows, anchors, C, device) -> list[torch.Tensor]:
    """MN's logits: one pass over the rows of the model that makes the negatives (the reference by default)."""
    rows_only = build_document_layout(rows, anchors, None, C, device=device)
    if trainer.cfg.negatives_model == "policy":
        policy = trainer.policy_for_negatives()
        with torch.no_grad():
            return anchor_gold_logits(policy, rows_only, C)
    ref = trainer.reference
    with ref._context():
        return anchor_gold_logits(ref.model, rows_only, C)


@torch.no_grad()
def _reference_logps(trainer, layout, opts) -> torch.Tensor:
    """(M, K+1) reference log-probs of the anchors' candidates: the same one-pass layout, no gradient."""
    ref = trainer.reference
    model = getattr(ref, "model", None)
    if model is None:
        raise ValueError(f"reference {ref.name!r} holds no model: document rows score the reference live "
                         "(frozen_copy or adapter_disabled)")
    with ref._context():
        return document_logps(model, layout, **opts).anchors.logps.float()
