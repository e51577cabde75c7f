"""From dataset items to batches: the collated lists, the candidate batch of gold + negatives, and what one
optimizer step holds.

Data flows one way (README, "Development"): an item ``{"prefix_ids", "continuation_ids", "id"[, "offline"][, "epoch"]}``
-> :func:`collate_examples` (:class:`~seqcpo.types.Example` objects) -> :func:`candidate_batch` (gold + negatives,
:class:`~seqcpo.types.CandidateBatch`) -> log-probs -> loss. :class:`StepCounts` is what the trainer divides by
so that a step does not depend on how its examples were split into micro-batches and processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from seqcpo.types import CandidateBatch, Example, Negatives


class ExampleDataset(Dataset):
    """Examples as dicts the collator understands; attaches fixed negatives by example id when given."""

    def __init__(self, examples: list[Example], offline: dict[str, dict] | None = None):
        self.examples = examples
        self.offline = offline
        if offline is not None:
            missing = [str(ex.meta.get("id")) for ex in examples if str(ex.meta.get("id")) not in offline]
            if missing:
                raise ValueError(
                    f"negatives_path has no negatives for {len(missing)} training examples (first: id {missing[0]}); "
                    "re-run `seqcpo negatives` with the same data settings"
                )

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ex = self.examples[i]
        item = {"prefix_ids": ex.prefix_ids, "continuation_ids": ex.continuation_ids, "id": str(ex.meta.get("id", i))}
        item.update(preference_fields(ex))
        if self.offline is not None:
            item["offline"] = self.offline[item["id"]]
        return item


def preference_fields(ex: Example) -> dict[str, Any]:
    """The item keys of a preference example's own data (``rejected_ids``, ``scores``); {} for other examples."""
    out: dict[str, Any] = {}
    if ex.rejected_ids is not None:
        out["rejected_ids"] = ex.rejected_ids
    if ex.scores is not None:
        out["scores"] = ex.scores
    return out


def collate_examples(features: list[dict[str, Any]]) -> dict[str, Any]:
    """Dataset items -> one batch: the :class:`~seqcpo.types.Example` of every item (token ids stay python
    lists until a layout is built), their fixed negatives, and the epoch each was drawn in.

    An item may carry the ``epoch`` it was drawn in (a streaming dataset does); the trainer seeds the
    example's draws with it (:mod:`seqcpo.seeding`), else with the trainer's own epoch. Preference items carry
    ``rejected_ids`` (and ``scores``) into their :class:`~seqcpo.types.Example`.

    >>> collate_examples([{"prefix_ids": [1, 2], "continuation_ids": [3], "id": "a"}])
    {'examples': [Example(prefix_ids=[1, 2], continuation_ids=[3], meta={'id': 'a'}, rejected_ids=None, scores=None)], 'offline': None, 'epochs': None}
    """
    return {
        "examples": [
            Example(prefix_ids=list(f["prefix_ids"]), continuation_ids=list(f["continuation_ids"]), meta={"id": str(f["id"])},
                    rejected_ids=f.get("rejected_ids"), scores=f.get("scores"))
            for f in features
        ],
        "offline": [f["offline"] for f in features] if "offline" in features[0] else None,
        "epochs": [int(f["epoch"]) for f in features] if "epoch" in features[0] else None,
    }


def negatives_from_offline(rows: list[dict]) -> tuple[Negatives, torch.Tensor | None]:
    """Rows of ``seqcpo negatives`` (:mod:`seqcpo.training.offline`) -> their :class:`Negatives` and the
    (B, K+1) reference log-probs stored with them (None when they have none)."""
    neg = Negatives(
        ids=[r["negatives"] for r in rows],
        valid=[r["valid"] for r in rows],
        scores=[r["scores"] for r in rows] if rows[0].get("scores") is not None else None,
        sources=[r["sources"] for r in rows],
    )
    ref = None
    if rows[0].get("ref_logps") is not None:
        ref = torch.tensor([r["ref_logps"] for r in rows], dtype=torch.float32)
    return neg, ref


def negatives_to_offline(examples: Sequence[Example], neg: Negatives, ref_logps: torch.Tensor) -> list[dict]:
    """The inverse of :func:`negatives_from_offline`: one ``seqcpo negatives`` row per example (the columns of
    :mod:`seqcpo.training.offline`), ``ref_logps`` (B, K+1) on the CPU."""
    return [
        {
            "id": str(ex.meta.get("id")),
            "prefix_ids": list(ex.prefix_ids),
            "gold_ids": list(ex.continuation_ids),
            "negatives": [list(n) for n in neg.ids[j]],
            "valid": [bool(v) for v in neg.valid[j]],
            "scores": [float(x) for x in neg.scores[j]] if neg.scores is not None else None,
            "sources": list(neg.sources[j]),
            "ref_logps": [float(x) for x in ref_logps[j].tolist()],
        }
        for j, ex in enumerate(examples)
    ]


def row_fits(row: dict[str, Any], prefix_ids: Sequence[int], gold_ids: Sequence[int],
             rejected_ids: Sequence[Sequence[int]] | None = None) -> bool:
    """Whether a folder's row was made from this example: the same prefix and gold token ids, and every "data"
    negative one of its rejected answers. The check of a streamed run, which cannot digest its whole split before
    it starts (``seqcpo.training.offline_reader`` digests one held in memory): a data file changed in place under
    the same ids is refused at the first changed example instead of training on the old rows."""
    if list(row.get("prefix_ids") or []) != list(prefix_ids) or list(row.get("gold_ids") or []) != list(gold_ids):
        return False
    rejected = [list(r) for r in rejected_ids or []]
    return all(list(n) in rejected for n, s, v in zip(row.get("negatives") or [], row.get("sources") or [],
                                                      row.get("valid") or []) if s == "data" and v)


def candidate_batch(examples: list[Example], negatives: Negatives | None, ref_logps=None) -> CandidateBatch:
    """Gold + negatives -> :class:`CandidateBatch` (column 0 the gold)."""
    if negatives is None:
        return CandidateBatch(
            prefix_ids=[e.prefix_ids for e in examples],
            candidate_ids=[[e.continuation_ids] for e in examples],
            candidate_mask=[[True] for _ in examples],
        )
    return CandidateBatch(
        prefix_ids=[e.prefix_ids for e in examples],
        candidate_ids=[[e.continuation_ids] + list(n) for e, n in zip(examples, negatives.ids)],
        candidate_mask=[[True] + list(v) for v in negatives.valid],
        ref_logps=ref_logps,
        sources=negatives.sources,
    )


def target_tokens(prefix_ids: Sequence[int], continuation_ids: Sequence[int]) -> int:
    """Gold continuation tokens that are prediction targets: all of them, except token 0 after an empty prefix
    (nothing predicts it; :mod:`seqcpo.pss` skips it, :func:`seqcpo.logps.sequence_logps` refuses empty prefixes).

    >>> target_tokens([5, 6], [7, 8, 9]), target_tokens([], [7, 8, 9])
    (3, 2)
    """
    n = len(continuation_ids)
    return n - 1 if len(prefix_ids) == 0 and n > 0 else n


@dataclass(frozen=True)
class StepCounts:
    """What one optimizer step holds, summed over its accumulation micro-batches and over all processes.

    The trainer divides the summed MLE / PSS token losses by ``tokens`` and the summed per-example CPO / DPO
    losses by ``examples`` (transformers' ``num_items_in_batch`` convention), so the step's gradient is the
    same however its examples were split.

    Attributes:
        tokens: gold continuation target tokens (:func:`target_tokens`).
        examples: examples.
    """

    tokens: int
    examples: int


def local_step_counts(batches: Sequence[dict[str, Any]], anchors=None) -> tuple[int, int]:
    """``(target tokens, examples)`` of one process's micro-batches (collated by :func:`collate_examples`).

    ``anchors``: for document rows, ``n -> the anchors of a row of n tokens``
    (:func:`seqcpo.document_rows.anchor_count`); the second count is then the anchors, what the CPO term is
    averaged over."""
    examples = [e for b in batches for e in b["examples"]]
    tokens = sum(target_tokens(e.prefix_ids, e.continuation_ids) for e in examples)
    if anchors is not None:
        return tokens, sum(anchors(len(e.prefix_ids) + len(e.continuation_ids)) for e in examples)
    return tokens, len(examples)
