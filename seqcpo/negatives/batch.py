"""BN, batch negatives (docs/method.md, "Negatives" table, row BN; ranked variant BNR).

Construction: the negatives of example b are the gold continuations of other examples in the same
batch, drawn at random without replacement among the *distinct* golds that differ from b's gold (two
examples sharing a gold count once, so no negative copies the gold and no two negatives of a row are
equal). A batch that cannot supply K such golds (a short last batch, or repeated golds) fills the missing
columns with dropped negatives (``valid=False``, masked out of the loss) and logs it once; a batch with no
other distinct gold at all raises ``ValueError``. The trainer's config already refuses a batch size below
K_bn + 1.

Ranked (BNR): by similarity to the gold, ``score = rouge_l_f(negative, gold)``, higher = better.

Dropped rule (shared by all generators): a negative identical to the gold never enters the loss;
BN excludes such golds before drawing, so all its negatives are valid (``max_tries`` is accepted for a
uniform interface).

Seeding: BN depends on its batch by definition (its negatives are the batch's other golds), so unlike the other
generators an example's BN negatives change with the batch size, the accumulation and the number of processes.
Its draw for example b comes from a fork of ``generator[b]`` (:func:`seqcpo.seeding.fork`) that leaves the
example's own stream untouched, so the generators after BN in a mixture stay split-invariant.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from seqcpo.negatives.similarity import rouge_l_f
from seqcpo.negatives.base import NegativesBuilder, check_k
from seqcpo.seeding import Generators, fork, per_example_generators
from seqcpo.types import Example, Negatives

logger = logging.getLogger(__name__)


class BatchNegatives:
    """BN: other examples' golds from the same batch.

    Returns ``Negatives`` with ``ids[b][k]`` a copy of another example's ``continuation_ids`` and, when
    ranked, ``scores[b][k]`` its ROUGE-L F to example b's gold.
    """

    name = "bn"
    needs_model = False

    def __init__(self, max_tries: int = 8):
        self.max_tries = max_tries
        self._warned = False

    def __call__(
        self,
        examples: Sequence[Example],
        k: int,
        generator: Generators,
        ranked: bool = False,
    ) -> Negatives:
        """K negatives per example from the batch's other golds; ``generator``: one per example, or one for the
        call."""
        check_k("bn", k)
        golds = [list(ex.continuation_ids) for ex in examples]
        distinct: list[list[int]] = []
        for g in golds:
            if g not in distinct:
                distinct.append(g)
        if len(distinct) < 2:
            raise ValueError(
                "batch negatives need other examples with a different gold in the batch: "
                f"got batch size {len(examples)} ({len(distinct)} distinct gold) for k={k}; "
                "raise the batch size or use another generator"
            )
        if len(distinct) < k + 1 and not self._warned:
            logger.warning(
                "bn: a batch of %d examples has %d distinct golds, fewer than k+1=%d; the missing batch negatives "
                "are dropped (masked out of the loss) for this batch", len(examples), len(distinct), k + 1,
            )
            self._warned = True
        # the pool's size depends on the batch: draw from forks so each example's own stream does not move
        gens = fork(per_example_generators(generator, len(examples)), "bn")
        out = NegativesBuilder(self.name, ranked)
        for gold, rng in zip(golds, gens):
            pool = [g for g in distinct if g != gold]
            pick = torch.randperm(len(pool), generator=rng)[:k].tolist()
            ids = [list(pool[i]) for i in pick]
            valid = [True] * len(ids)
            scores = [rouge_l_f(neg, gold) for neg in ids] if ranked else []
            missing = k - len(ids)
            # dropped placeholders: the gold itself, never valid, ranked last
            ids += [list(gold) for _ in range(missing)]
            valid += [False] * missing
            if ranked:
                scores += [-1.0] * missing
            out.add(ids, valid, scores)
        return out.build()
