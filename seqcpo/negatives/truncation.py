"""TN, truncation negatives (docs/method.md, "Negatives" table, row TN; ranked variant TNR).

Construction: strip a trailing EOS from the gold ``y_0`` if it has one, keep ``body[:j]`` and append EOS.
The cut ``j`` is uniform over ``min_keep .. len(body) - 1`` (docs/method.md default: ``min_keep = 1``), so a
negative is always a strict prefix of the gold's text that claims to end early. The K cuts of one
example are distinct while enough positions exist; once every position is used, the remaining cuts are
drawn with replacement.

Ranked (TNR): a longer kept part is better; ``score = j``.

Dropped rule (shared by all generators): a negative identical to the gold never enters the loss. When
no proper cut exists (a gold of at most ``min_keep`` tokens, EOS aside, e.g. a one-token gold) TN keeps
``body + [EOS]`` as a placeholder with ``valid = False``, and the loss masks that column out. A gold
with a proper cut can never be copied, so TN needs no resampling (``max_tries`` is accepted for a
uniform interface).

Seeding: example b's cuts come from its own generator (``generator[b]``, see :mod:`seqcpo.seeding`), so they do
not depend on the other examples of the batch.
"""

from __future__ import annotations

from typing import Sequence

import torch

from seqcpo.negatives.base import NegativesBuilder, check_k
from seqcpo.seeding import Generators, per_example_generators
from seqcpo.types import Example, Negatives


def _draw_cuts(low: int, high: int, k: int, generator: torch.Generator) -> list[int]:
    """K cuts in ``low..high`` (inclusive): a random permutation first, then with replacement."""
    n = high - low + 1
    perm = torch.randperm(n, generator=generator)[:k].tolist()
    extra = torch.randint(n, (k - len(perm),), generator=generator).tolist() if k > n else []
    return [low + c for c in perm + extra]


class TruncationNegatives:
    """TN: the gold cut at a random position and ended with EOS.

    Args:
        eos_token_id: the id appended to every negative (and stripped from the gold's end first).
        min_keep: the fewest gold tokens a negative keeps (>= 1).
        max_tries: accepted for the common interface; TN never draws a copy of the gold.

    Returns ``Negatives`` with ``ids[b][k]`` of length ``j + 1`` and, when ranked, ``scores[b][k] = j``.
    """

    name = "tn"
    needs_model = False

    def __init__(self, eos_token_id: int, min_keep: int = 1, max_tries: int = 8):
        if min_keep < 1:
            raise ValueError(f"tn: min_keep must be >= 1, got {min_keep}")
        self.eos_token_id = eos_token_id
        self.min_keep = min_keep
        self.max_tries = max_tries

    def __call__(
        self,
        examples: Sequence[Example],
        k: int,
        generator: Generators,
        ranked: bool = False,
    ) -> Negatives:
        """K negatives per example; ``generator``: one per example, or one for the call."""
        check_k("tn", k)
        eos = self.eos_token_id
        out = NegativesBuilder(self.name, ranked)
        for ex, g in zip(examples, per_example_generators(generator, len(examples))):
            gold = list(ex.continuation_ids)
            body = gold[:-1] if gold and gold[-1] == eos else gold
            low, high = self.min_keep, len(body) - 1
            if high >= low:
                cuts = _draw_cuts(low, high, k, g)
                ids = [body[:j] + [eos] for j in cuts]
                valid = [neg != gold for neg in ids]  # always True; kept as the shared rule's guard
            else:
                # No proper cut: placeholder that the loss masks out (the dropped rule above).
                cuts = [len(body)] * k
                ids = [body + [eos] for _ in range(k)]
                valid = [False] * k
            scores = [float(j) for j in cuts]
            out.add(ids, valid, scores)
        return out.build()
