"""The protocol every negative generator follows (docs/method.md, "Negatives").

A generator takes gold examples and seeded ``torch.Generator`` objects, one per example (or one for the whole
call), and returns :class:`seqcpo.types.Negatives`: K token-id continuations per example, a validity flag per
negative, and (when ``ranked``) a score per negative, higher = better, by the rule of docs/method.md's table for that
generator.

Example b's draws come from ``generator[b]`` only (:mod:`seqcpo.seeding`), so its negatives do not depend on the
batch it sits in: not on the batch size, the gradient accumulation, the number of processes or the step a run
resumed from. BN is the exception by definition (its negatives are the batch's other golds).
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from seqcpo.seeding import Generators
from seqcpo.types import Example, Negatives


@runtime_checkable
class NegativeGenerator(Protocol):
    """Makes K negatives per example.

    ``name`` is the short generator name ("an", "bn", "mn", "tn", "mix").
    ``needs_model`` says whether the generator runs a model (AN, MN): such negatives change as the model
    changes, so reference log-probs for them cannot be precomputed unless the negatives are fixed offline.
    A generator that can reuse the caller's teacher-forced logits sets ``uses_gold_logits = True`` and takes a
    ``gold_logits`` keyword (see :func:`uses_gold_logits`).
    """

    name: str
    needs_model: bool

    def __call__(
        self,
        examples: Sequence[Example],
        k: int,
        generator: Generators,
        ranked: bool = False,
    ) -> Negatives:
        ...


def uses_gold_logits(generator) -> bool:
    """Whether ``generator`` accepts ``gold_logits=`` (the logits of a teacher-forced pass over ``x + y_0``
    that the caller already ran with the generator's model; MN, or a mixture with MN in it)."""
    return bool(getattr(generator, "uses_gold_logits", False))


def check_k(name: str, k: int) -> None:
    """The one check that a generator was asked for K >= 1 negatives per example (``name``: the generator)."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"{name}: k must be an integer >= 1, got {k!r}")


class NegativesBuilder:
    """Collects each example's K negatives in turn and builds :class:`Negatives`.

    When ``ranked``, every row is reordered best first by its scores (``sort_best_first``), which is how all
    generators hand the ranking to the loss: column order is the ranking.
    """

    def __init__(self, name: str, ranked: bool):
        self.name = name
        self.ranked = ranked
        self.ids: list[list[list[int]]] = []
        self.valid: list[list[bool]] = []
        self.scores: list[list[float]] = []

    def add(self, ids: list[list[int]], valid: list[bool], scores: list[float]) -> None:
        from seqcpo.negatives.similarity import sort_best_first

        if self.ranked:
            ids, valid, scores = sort_best_first(ids, valid, scores)
        self.ids.append(ids)
        self.valid.append(valid)
        self.scores.append(scores)

    def build(self) -> Negatives:
        return Negatives(
            ids=self.ids,
            valid=self.valid,
            scores=self.scores if self.ranked else None,
            sources=[[self.name] * len(row) for row in self.ids],
        )
