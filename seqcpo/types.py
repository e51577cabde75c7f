"""Plain data types that flow through seqcpo.

Data flows one way (README, "Development"): raw records -> :class:`Example` (prefix, continuation token ids)
-> :class:`Negatives` (K synthetic continuations per example) -> :class:`CandidateBatch`
(gold + negatives, ready for :func:`seqcpo.logps.sequence_logps`) -> log-probs -> loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Example:
    """One (prefix, continuation) pair as token ids.

    ``prefix_ids`` is ``x`` and ``continuation_ids`` the gold ``y_0`` of docs/method.md. ``meta`` carries
    anything the data source knows (id, category, title) and is never used by the algorithm.

    Preference data (:mod:`seqcpo.data.preference`) adds the row's own negatives:

    - ``rejected_ids``: the row's rejected answers as token-id lists (each ending in EOS), best first; the
      ``data`` negative source (:mod:`seqcpo.negatives.data`) puts them in the first negative slots;
    - ``scores``: the data's scores of gold + rejected (``1 + len(rejected_ids)`` floats, gold first, higher =
      better), for a ranked list given with ``scores`` or ``ranks``; None when the data has no scores.
    """

    prefix_ids: list[int]
    continuation_ids: list[int]
    meta: dict[str, Any] = field(default_factory=dict)
    rejected_ids: list[list[int]] | None = None
    scores: list[float] | None = None


@dataclass
class Negatives:
    """K negative continuations for each of B examples.

    Attributes:
        ids: ``ids[b][k]`` is the token-id list of negative k of example b; every example has exactly K.
        valid: ``valid[b][k]`` is False for a negative that must not enter the loss (it could not be made
            different from the gold); the loss masks such a column out of the softmax.
        scores: ``scores[b][k]``, higher = a better (closer to the gold) negative; the ranked objective
            orders negatives by it. ``None`` when the generator was not asked to rank.
        sources: ``sources[b][k]`` names the generator that made the negative ("tn", "bn", "mn", "an").
    """

    ids: list[list[list[int]]]
    valid: list[list[bool]]
    scores: list[list[float]] | None
    sources: list[list[str]]

    @property
    def k(self) -> int:
        return len(self.ids[0]) if self.ids else 0

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class CandidateBatch:
    """B prefixes, each with K+1 candidate continuations (column 0 the gold, 1..K the negatives).

    Attributes:
        prefix_ids: B token-id lists.
        candidate_ids: ``candidate_ids[b][i]``, i in 0..K, token-id lists; column 0 is the gold.
        candidate_mask: (B, K+1) bool nested lists; False marks a dropped negative (never the gold).
        ref_logps: optional (B, K+1) reference log-probs precomputed with the negatives.
        sources: optional ``sources[b][k]``, the generator of negative k (:attr:`Negatives.sources`); the list
            losses read which columns hold the data's own rejected answers from it.
    """

    prefix_ids: list[list[int]]
    candidate_ids: list[list[list[int]]]
    candidate_mask: list[list[bool]]
    ref_logps: Any = None  # torch.Tensor (B, K+1) when precomputed
    sources: list[list[str]] | None = None

    @property
    def num_candidates(self) -> int:
        return len(self.candidate_ids[0])

    def __len__(self) -> int:
        return len(self.prefix_ids)
