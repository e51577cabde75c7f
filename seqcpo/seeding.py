"""One seed per example: where every random draw of training comes from.

A run's result must not depend on how it was split or interrupted. Every random part of a step
(TN cut points, MN replacements, AN samples, PSS mixing) therefore draws from a ``torch.Generator`` of its own
example, seeded by

    (run seed, example id, epoch, purpose)

through :func:`example_seed`, never by the step, the micro-batch or the process. An example's negatives are
then the same whatever the batch size, the gradient accumulation, the number of processes or the step a run
resumed from. ``purpose`` keeps independent streams apart (``"negatives"``, ``"pss"``, ``"eval/negatives"``).

The generators of :mod:`seqcpo.negatives` and :func:`seqcpo.pss.pss_loss` take one generator per example (a
list) or, as before, one generator for the whole call: :func:`per_example_generators` turns the latter into one
child per example, so both go through the same per-example code.

Two draws cannot be per example by nature and are documented where they happen: BN picks other examples'
golds from its batch, and dropout inside a batched forward pass (a model in train mode) sees the whole batch;
such a pass is seeded by :func:`joint_seed`, which reads the examples' generators without advancing them, so it
never shifts an example's own stream.
"""

from __future__ import annotations

import hashlib
from typing import Sequence, Union

import torch

#: A generator argument: one ``torch.Generator`` per example, or one for the whole call.
Generators = Union[torch.Generator, Sequence[torch.Generator]]

_MASK63 = (1 << 63) - 1


def _seed_from(text: bytes) -> int:
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & _MASK63


def example_seed(seed: int, example_id: str, epoch: int, purpose: str) -> int:
    """The seed of one example's draws for one purpose in one epoch (a 63-bit int).

    >>> example_seed(0, "r7", 0, "negatives") == example_seed(0, "r7", 0, "negatives")
    True
    >>> example_seed(0, "r7", 0, "negatives") != example_seed(0, "r7", 1, "negatives")
    True
    """
    return _seed_from(f"{int(seed)}\x1f{example_id}\x1f{int(epoch)}\x1f{purpose}".encode())


def example_generators(
    seed: int, example_ids: Sequence[str], epochs: int | Sequence[int], purpose: str
) -> list[torch.Generator]:
    """One CPU generator per example, seeded by :func:`example_seed`; ``epochs`` is one int for all or one
    per example."""
    ids = [str(i) for i in example_ids]
    eps = [int(epochs)] * len(ids) if isinstance(epochs, int) else [int(e) for e in epochs]
    if len(eps) != len(ids):
        raise ValueError(f"got {len(eps)} epochs for {len(ids)} examples")
    return [torch.Generator().manual_seed(example_seed(seed, i, e, purpose)) for i, e in zip(ids, eps)]


def per_example_generators(generator: Generators, n: int) -> list[torch.Generator]:
    """A generator argument as ``n`` generators, one per example.

    A list is checked and returned as is. A single generator (one for the whole call) gives ``n`` children,
    each seeded by a draw from it in order, so the call is still reproducible from its seed.
    """
    if isinstance(generator, torch.Generator):
        seeds = torch.randint(0, 2**62, (n,), generator=generator).tolist()
        return [torch.Generator().manual_seed(int(s)) for s in seeds]
    gens = list(generator)
    if len(gens) != n:
        raise ValueError(f"got {len(gens)} generators for {n} examples; pass one per example")
    return gens


def _state_bytes(g: torch.Generator) -> bytes:
    return g.get_state().numpy().tobytes()


def fork(generators: Sequence[torch.Generator], purpose: str) -> list[torch.Generator]:
    """A child of each generator for ``purpose``, seeded from its current state, without advancing it.

    For a draw whose size depends on more than the example (BN's pool is its batch): taking it from a child
    keeps the example's own stream where it was.
    """
    return [torch.Generator().manual_seed(_seed_from(_state_bytes(g) + purpose.encode())) for g in generators]


def joint_seed(generators: Sequence[torch.Generator]) -> int:
    """One seed from the current states of all ``generators``, without advancing any; for a batched model call
    whose own randomness (dropout) cannot be split per example."""
    h = hashlib.sha256()
    for g in generators:
        h.update(_state_bytes(g))
    return int.from_bytes(h.digest()[:8], "little") & _MASK63
