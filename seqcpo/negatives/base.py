"""The protocol every negative generator follows (PAPER.md, "Negatives").

A generator takes gold examples and a seeded ``torch.Generator`` and returns :class:`seqcpo.types.Negatives`:
K token-id continuations per example, a validity flag per negative, and (when ``ranked``) a score per
negative, higher = better, by the rule of PAPER.md's table for that generator.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch

from seqcpo.types import Example, Negatives


@runtime_checkable
class NegativeGenerator(Protocol):
    """Makes K negatives per example.

    ``name`` is the short generator name ("an", "bn", "mn", "tn", "mix").
    ``needs_model`` says whether the generator runs a model (AN, MN): such negatives change as the model
    changes, so reference log-probs for them cannot be precomputed unless the negatives are fixed offline.
    """

    name: str
    needs_model: bool

    def __call__(
        self,
        examples: Sequence[Example],
        k: int,
        generator: torch.Generator,
        ranked: bool = False,
    ) -> Negatives:
        ...
