"""The training step's loss on document rows (``task: document``): MLE on every row token, CPO at anchors.

For a micro-batch of rows (chunks of documents, :mod:`seqcpo.data.documents`):

1. each row's anchors are drawn from its own generator (seed, row id, epoch, "anchors"), the row id naming
   (document, chunk) (:func:`seqcpo.document_rows.choose_anchors`);
2. every anchor becomes a window (prefix = the row up to it, gold = its next ``continuation_tokens``) with the id
   ``"<row id>@<anchor>"``, and the configured generators make its K negatives from that id's generator
   (:meth:`SeqCPOTrainer.make_negatives`): TN, MN, AN and their mixtures exactly as for windows, BN from the
   other anchors' golds of the micro-batch. MN draws from the logits of one pass over the rows of its model
   (the reference by default), no window pass per anchor; AN's shared-prefill backend sees that the anchors'
   prefixes are prefixes of one another and prefills each row once for all its anchors (in one chunk of
   ``an_batch_size`` windows), cutting each anchor's KV cache from it (:mod:`seqcpo.negatives.prefix_kv`);
3. the policy runs the rows with every anchor's negatives as branches in one forward pass
   (:func:`seqcpo.document_rows.document_logps`): the MLE term and the golds' log-probs come from the rows, the
   negatives' from their branches; the reference runs the same layout without gradient (frozen copy, bf16
   copy or the LoRA policy with its adapter off);
4. :func:`seqcpo.losses.step_loss` makes ``L = mle_weight * (-sum of row token log-probs) / step tokens + lambda
   * sum of anchor CPO losses / step anchors``: the step's tokens are its rows' predicted tokens and its anchors
   are counted by :func:`seqcpo.document_rows.anchor_count` before any is drawn
   (:meth:`SeqCPOTrainer.get_batch_samples`), so a step does not depend on its split.

With fixed negatives (``negatives_path``, made by ``seqcpo negatives``) steps 1 and 2 read instead of draw: every
epoch's anchors are each row's epoch-0 draw, and each window's negatives (and, with ``reference: precomputed``,
its reference log-probs, cached per (document, chunk, anchor)) are the folder's row of its id
(:mod:`seqcpo.training.offline_documents`); a window missing from the folder is a one-line error.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from seqcpo.batching import negatives_from_offline
from seqcpo.document_rows import (
    anchor_count,
    anchor_examples,
    anchor_gold_logits,
    build_document_layout,
    choose_anchors,
    document_logps,
)
from seqcpo.hf_model import unwrap_model
from seqcpo.losses import preference_metric_sums
from seqcpo.negatives import uses_gold_logits
from seqcpo.reference import NoReference, PrecomputedReference
from seqcpo.training.scoring import preference_term
from seqcpo.types import Example


def anchor_counter(cfg):
    """``n -> anchors of a row of n tokens`` under ``cfg`` (for the step's counts)."""
    return lambda n: anchor_count(n, cfg.continuation_tokens, cfg.anchors_per_row, cfg.anchor_stride)


def document_terms(trainer, model, examples: list[Example], epochs, training: bool):
    """The micro-batch's summed row NLL, summed anchor CPO losses and metric sums ``name -> (sum, count)`` (the
    CPO ones counted in anchors), for :func:`seqcpo.losses.step_loss`; ``examples``: the rows, as the collator
    hands them over (first token, the rest)."""
    cfg = trainer.cfg
    C = cfg.continuation_tokens
    rows = [list(e.prefix_ids) + list(e.continuation_ids) for e in examples]
    ids = [str(e.meta["id"]) for e in examples]
    device = next(model.parameters()).device
    fixed = getattr(trainer, "offline_windows", None)
    if fixed is not None:  # fixed negatives (negatives_path): fixed anchors, rows looked up by window id
        anchors, windows, negatives, stored_ref = _fixed(trainer, fixed, rows, ids)
    else:
        anchors, windows, negatives = _made(trainer, rows, ids, epochs, training, device)
        stored_ref = None
    layout = build_document_layout(rows, anchors, negatives.ids if negatives else None, C, device=device)
    opts = dict(length_normalize=cfg.normalized_logps, chunk_size=cfg.logits_chunk_size)
    out = document_logps(model, layout, **opts)
    nll = -out.row_summed.sum()
    if not windows:  # rows too short for an anchor: the MLE term alone
        return nll, nll.new_zeros(()), {"loss/cpo": (0.0, 0)}
    if isinstance(trainer.reference, PrecomputedReference):  # cached by `seqcpo negatives` per window
        ref = trainer.reference.logps(SimpleNamespace(ref_logps=stored_ref)).to(out.anchors.logps.device)
    elif isinstance(trainer.reference, NoReference):  # reference-free: s_i = beta * mean token log-prob
        ref = torch.zeros(out.anchors.logps.shape, dtype=torch.float32, device=out.anchors.logps.device)
    else:
        ref = _reference_logps(trainer, layout, opts).to(out.anchors.logps.device)
    mask = torch.tensor([[True] + list(v) for v in negatives.valid], dtype=torch.bool, device=ref.device)
    # the objective's own term, as on windows (target margin, list losses' labels from the negatives' sources)
    cands = SimpleNamespace(sources=negatives.sources, num_candidates=mask.shape[1])
    cpo = preference_term(cfg, out.anchors.logps, ref, mask, cands, windows).sum()
    sums = preference_metric_sums(out.anchors.logps.detach(), ref, cfg.beta, mask=mask)
    sums["loss/cpo"] = (cpo.item(), len(windows))
    n_neg = mask[:, 1:].numel()
    sums["negatives/dropped"] = (float(n_neg - int(mask[:, 1:].sum())), n_neg)
    return nll, cpo, sums


def _made(trainer, rows, ids, epochs, training: bool, device):
    """(anchors, windows, negatives or None) drawn now: each row's anchors from its generator at the epoch it
    was drawn in, each window's negatives by the configured generators."""
    cfg = trainer.cfg
    C = cfg.continuation_tokens
    rngs = trainer.example_rngs(ids, training, "anchors", epochs)
    anchors = [choose_anchors(len(r), C, cfg.anchors_per_row, cfg.anchor_stride, g) for r, g in zip(rows, rngs)]
    windows = anchor_examples(rows, ids, anchors, C)
    if not windows:
        return anchors, windows, None
    if trainer.generator is None:  # negatives_path set, but the folder's rows were not handed to the trainer
        raise ValueError(f"negatives_path={cfg.negatives_path!r}: document rows look their windows' fixed negatives "
                         "up in the step; pass the folder's rows as SeqCPOTrainer(offline_windows=...) (seqcpo train "
                         "does)")
    anchor_epochs = None if epochs is None else [e for e, a in zip(epochs, anchors) for _ in a]
    gold_logits = _gold_logits(trainer, rows, anchors, C, device) if uses_gold_logits(trainer.generator) else None
    return anchors, windows, trainer.make_negatives(windows, training, gold_logits=gold_logits, epochs=anchor_epochs)


def _fixed(trainer, offline, rows, ids):
    """(anchors, windows, negatives or None, stored reference log-probs (M, K+1) or None) with fixed negatives:
    the anchors of every epoch are the epoch-0 draw (:mod:`seqcpo.training.offline_documents`), each window's
    negatives and reference log-probs the folder's row of its id."""
    from seqcpo.training.offline_documents import fixed_anchors, fixed_window_rows

    cfg = trainer.cfg
    anchors = fixed_anchors(cfg, rows, ids)
    windows = anchor_examples(rows, ids, anchors, cfg.continuation_tokens)
    if not windows:
        return anchors, windows, None, None
    found = fixed_window_rows(offline, windows, getattr(offline, "path", cfg.negatives_path))
    negatives, stored_ref = negatives_from_offline(found)
    return anchors, windows, negatives, stored_ref


def _gold_logits(trainer, rows, anchors, C, device) -> list[torch.Tensor]:
    """MN's logits: one pass over the rows of the model that makes the negatives (the reference by default)."""
    rows_only = build_document_layout(rows, anchors, None, C, device=device)
    ref = trainer.reference
    if trainer.cfg.negatives_model == "policy" or getattr(ref, "model", None) is None:
        # the policy's (a reference-free run's generators use the live policy: seqcpo.training.negatives_model)
        policy = trainer.policy_for_negatives() if trainer.cfg.negatives_model == "policy" else unwrap_model(trainer.model)
        with torch.no_grad():
            return anchor_gold_logits(policy, rows_only, C)
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
