"""Mixtures of negative generators in one batch (docs/method.md, "Negatives": "Mixtures of generators in one
batch are allowed").

Each generator makes its share of the K negatives per example; the shares are concatenated in the
order listed, so column ``i`` always comes from the same generator (``sources`` says which).

Ranked: the groups keep the order listed (list the generators best first, e.g. "an:2,tn:2"), each
group is ranked by its own rule (docs/method.md table), and each group's scores are shifted, per example, so
that every score of a group lies above every score of the groups after it: a row's scores stay
non-increasing across group boundaries, and differences within a group are unchanged.

Dropped rule: each generator applies it to its own negatives; the mixture passes ``valid`` through.

Seeding: the parts draw in the order listed from the same per-example generators (:mod:`seqcpo.seeding`); each
part's draws for an example depend on that example only (BN draws from a fork), so the mixture is as
split-invariant as its parts.
"""

from __future__ import annotations

from typing import Sequence

import torch

from seqcpo.negatives.base import NegativeGenerator, uses_gold_logits
from seqcpo.seeding import Generators
from seqcpo.types import Example, Negatives


class MixtureNegatives:
    """Several generators, each making a fixed count of the K negatives.

    Args:
        parts: ``[(generator, count), ...]``, counts >= 1; K must equal their sum.
    """

    name = "mix"

    def __init__(self, parts: Sequence[tuple[NegativeGenerator, int]]):
        if not parts:
            raise ValueError("mix: give at least one (generator, count) pair")
        for gen, count in parts:
            if int(count) != count or count < 1:
                raise ValueError(f"mix: every count must be a positive integer, got {count} for {getattr(gen, 'name', gen)!r}")
        self.parts = [(gen, int(count)) for gen, count in parts]
        self.needs_model = any(gen.needs_model for gen, _ in self.parts)
        self.uses_gold_logits = any(uses_gold_logits(gen) for gen, _ in self.parts)

    @property
    def k(self) -> int:
        """The K this mixture makes (the sum of its counts)."""
        return sum(count for _, count in self.parts)

    def __call__(
        self,
        examples: Sequence[Example],
        k: int,
        generator: Generators,
        ranked: bool = False,
        gold_logits: Sequence[torch.Tensor] | None = None,
    ) -> Negatives:
        """``gold_logits`` (see :class:`~seqcpo.negatives.mean_field.MeanFieldNegatives`) go to the parts that
        take them."""
        if k != self.k:
            counts = ", ".join(f"{gen.name}:{count}" for gen, count in self.parts)
            raise ValueError(f"mix: k={k} must equal the sum of the counts ({counts} = {self.k})")
        groups = []
        for gen, count in self.parts:
            extra = {"gold_logits": gold_logits} if gold_logits is not None and uses_gold_logits(gen) else {}
            groups.append(gen(examples, count, generator, ranked=ranked, **extra))
        ids = [sum((g.ids[b] for g in groups), []) for b in range(len(examples))]
        valid = [sum((g.valid[b] for g in groups), []) for b in range(len(examples))]
        sources = [sum((g.sources[b] for g in groups), []) for b in range(len(examples))]
        scores = None
        if ranked:
            scores = []
            for b in range(len(examples)):
                row: list[float] = []
                floor = None  # the highest score of the groups already placed after this one
                for g in reversed(groups):
                    s = list(g.scores[b])
                    if floor is not None and s and min(s) <= floor:
                        shift = floor + 1.0 - min(s)  # lift the whole group above the later ones
                        s = [x + shift for x in s]
                    if s:
                        floor = max(s)
                    row = s + row
                scores.append(row)
        return Negatives(ids=ids, valid=valid, scores=scores, sources=sources)
