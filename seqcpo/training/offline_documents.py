"""Fixed negatives for document rows (``task: document``): every row's anchor windows, with the anchors fixed.

During training without fixed negatives a row's anchors are drawn anew every epoch from the row's own generator,
seeded by (seed, row id, epoch, "anchors") (:mod:`seqcpo.document_rows`). A folder of fixed negatives can only
name anchors that exist before training, so with ``negatives_path`` the anchors are fixed as the negatives are:
each row's anchors are the **epoch-0 draw** of that generator, in ``seqcpo negatives`` and in every epoch of
training (:func:`fixed_anchors`). A run with live negatives draws the same anchors in its first epoch, so the two
take the same first steps (tests/test_document_offline.py).

``seqcpo negatives`` then treats every anchor ``a`` of a row as a window with the id ``"<row id>@<a>"`` (the id its
negatives are seeded by during training) and writes one folder row per window, keyed by that id: its K negatives
and the reference's log-probs of gold + negatives, so the reference is cached per (document, chunk, anchor).
:class:`DocumentWindows` is the sharding view: a shard holds the windows of ``shard_size`` consecutive rows and a
batch the windows of ``per_device_train_batch_size`` consecutive rows, as a training micro-batch would (BN draws
from the other anchors' golds of the batch, exactly as in training). Only the row's anchor positions are held
for the whole split; a window's tokens are cut from its row when its batch is scored, so memory stays that of the
rows plus one shard (the rows are held as ``seqcpo negatives`` holds any training split).

The negatives and reference log-probs are made the way a live training step makes them
(:mod:`seqcpo.training.document_step`): MN from one pass of the model over the rows, every candidate scored in
the one-pass row layout (:func:`seqcpo.document_rows.document_logps`), each window's draws seeded by its id at
epoch 0.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from seqcpo.batching import negatives_to_offline
from seqcpo.document_rows import (
    anchor_examples,
    anchor_gold_logits,
    build_document_layout,
    choose_anchors,
    document_logps,
)
from seqcpo.seeding import example_generators
from seqcpo.types import Example

#: the epoch whose anchor draw is kept with fixed negatives
FIXED_ANCHOR_EPOCH = 0


def fixed_anchors(cfg, rows: Sequence[Sequence[int]], row_ids: Sequence[str]) -> list[list[int]]:
    """Each row's anchors with fixed negatives: the epoch-0 draw of its own generator (the draw a live run makes
    in its first epoch), or every ``anchor_stride`` tokens."""
    rngs = example_generators(cfg.seed, [str(i) for i in row_ids], FIXED_ANCHOR_EPOCH, "anchors")
    return [choose_anchors(len(r), cfg.continuation_tokens, cfg.anchors_per_row, cfg.anchor_stride, g)
            for r, g in zip(rows, rngs)]


def _tokens(ex: Example) -> list[int]:
    return list(ex.prefix_ids) + list(ex.continuation_ids)


@dataclass
class DocumentBatch:
    """Consecutive rows scored together: their tokens, ids and fixed anchors; ``len`` is its windows."""

    rows: list[list[int]]
    ids: list[str]
    anchors: list[list[int]]

    def __len__(self) -> int:
        return sum(len(a) for a in self.anchors)


class DocumentWindows:
    """The training rows' anchor windows as ``seqcpo negatives`` shards them: one unit per row, one folder row
    per window (see the module docstring). Holds the rows and their anchors, never the windows."""

    def __init__(self, rows: Sequence[Example], cfg):
        self.rows = rows
        self.row_ids = [str(ex.meta.get("id")) for ex in rows]
        self.anchors = fixed_anchors(cfg, [_tokens(ex) for ex in rows], self.row_ids)

    @property
    def num_units(self) -> int:
        return len(self.rows)

    @property
    def num_rows(self) -> int:
        """Windows in all: the folder's rows."""
        return sum(len(a) for a in self.anchors)

    def ids(self, start: int, stop: int) -> list[str]:
        """The window ids of rows ``start .. stop - 1``, row by row, anchors increasing."""
        return [f"{rid}@{a}" for rid, row in zip(self.row_ids[start:stop], self.anchors[start:stop]) for a in row]

    def iter_ids(self) -> Iterator[str]:
        for rid, row in zip(self.row_ids, self.anchors):
            for a in row:
                yield f"{rid}@{a}"

    def batches(self, start: int, stop: int, batch_size: int) -> list[DocumentBatch]:
        """Rows ``start .. stop - 1`` in batches of ``batch_size`` rows (their windows scored together)."""
        stop = min(stop, len(self.rows))
        return [
            DocumentBatch([_tokens(ex) for ex in self.rows[i:min(i + batch_size, stop)]],
                          self.row_ids[i:min(i + batch_size, stop)], self.anchors[i:min(i + batch_size, stop)])
            for i in range(start, stop, batch_size)
        ]

    @staticmethod
    def scorer(cfg, model, tokenizer):
        return document_scorer(cfg, model, tokenizer)

    def digest(self) -> str:
        """sha256 over every row's id, tokens and anchors, in order: what decides the windows' tokens (a data
        file changed in place, another tokenizer or another anchor draw changes it)."""
        h = hashlib.sha256()
        for ex, rid, anchors in zip(self.rows, self.row_ids, self.anchors):
            h.update(json.dumps([rid, _tokens(ex), anchors]).encode())
        return h.hexdigest()[:16]


def document_scorer(cfg, model, tokenizer):
    """``score(batch) -> folder rows``: a batch of rows' windows, their K negatives and the reference's (``model``)
    log-probs of gold + negatives, made as a training step on these rows at epoch 0 makes them."""
    from seqcpo.negatives import build_negative_generator, uses_gold_logits

    C, K = cfg.continuation_tokens, cfg.num_negatives
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    gen = build_negative_generator(
        cfg.negatives_parts, K, model=model, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
        options=cfg.negative_options(offline=True),
    )

    def score(batch: DocumentBatch) -> list[dict]:
        windows = anchor_examples(batch.rows, batch.ids, batch.anchors, C)
        if not windows:
            return []
        device = next(model.parameters()).device
        rngs = example_generators(cfg.seed, [w.meta["id"] for w in windows], FIXED_ANCHOR_EPOCH, "negatives")
        extra = {}
        with torch.no_grad():
            if uses_gold_logits(gen):  # MN: one pass over the rows, as in training
                rows_only = build_document_layout(batch.rows, batch.anchors, None, C, device=device)
                extra["gold_logits"] = anchor_gold_logits(model, rows_only, C)
            neg = gen(windows, K, rngs, ranked=cfg.ranked, **extra)
            layout = build_document_layout(batch.rows, batch.anchors, neg.ids, C, device=device)
            ref = document_logps(model, layout, length_normalize=cfg.length_normalize,
                                 chunk_size=cfg.logits_chunk_size).anchors.logps
        return negatives_to_offline(windows, neg, ref.float().cpu())

    return score


def fixed_window_rows(offline, windows: Sequence[Example], path: str) -> list[dict]:
    """The folder rows of ``windows`` (ids ``"<row id>@<a>"``), in order; a window the folder lacks is a one-line
    error naming its id and the folder."""
    out = []
    for w in windows:
        wid = str(w.meta["id"])
        if wid not in offline:
            rid, a = wid.rsplit("@", 1)
            raise ValueError(
                f"negatives_path {path} has no fixed negatives for window {wid} (row {rid}, anchor {a}): it was "
                "made from other rows or anchors; make a folder for this run's data with `seqcpo negatives` (same "
                "config and overrides)"
            )
        out.append(offline[wid])
    return out
