"""The ``data`` negative source: a preference row's own rejected answers (docs/method.md, "Negatives").

Spec: ``"data"`` (all K negatives from the data) or a mixture such as ``"data:1,tn:3"``: ``data:n`` takes the
row's first n rejected answers (:attr:`seqcpo.types.Example.rejected_ids`, best first as the data ranks them) into
its n slots, and the synthetic generators listed fill the rest to K (see :mod:`seqcpo.negatives.mixture`).

Rows with fewer than n rejected answers: the missing data slots are filled by the **first synthetic generator of
the spec** (its best ones when ranked), drawn from a fork of the example's own generator
(:func:`seqcpo.seeding.fork`), so an example's other negatives do not move whether or not it is short. With no
synthetic generator in the spec (``"data"``), a missing slot holds a copy of the gold with ``valid=False`` and the
loss masks it out. A rejected answer equal to the gold after the answers were cut to the context is kept with
``valid=False`` too (equal texts are refused when the data is read).

Ranking (``cpo_ranked`` and the label-aware losses): column order is the ranking, and a mixture ranks its groups
in the order listed, so ``"data:1,tn:3"`` gives **gold > data (in the data's order) > synthetic**. The paper ranks
synthetic negatives only (each generator by its own rule); to rank the data's rejected answers below the
synthetic ones, list ``data`` last (``"tn:3,data:1"``). Scores: ``k - i`` for data slot ``i`` (non-increasing,
whatever fills the slot).
"""

from __future__ import annotations

from typing import Sequence

from seqcpo.negatives.base import NegativeGenerator, check_k
from seqcpo.seeding import Generators, fork, per_example_generators
from seqcpo.types import Example, Negatives


def check_data_examples(examples: Sequence[Example]) -> None:
    """Every example carries its data's rejected answers (a preference row's); a one-line ``ValueError`` naming the
    first that does not. Checked where the examples are made (run and dry run) and again when negatives are made."""
    for e in examples:
        if e.rejected_ids is None:
            raise ValueError(
                f"negatives 'data' needs preference examples (rejected answers); example {e.meta.get('id')!r} has "
                "none: use a preference dataset (task: preference) or drop 'data' from negatives"
            )


class DataNegatives:
    """The first k rejected answers of each example, missing ones filled by ``fill`` (or masked).

    Args:
        fill: a synthetic generator for rows with fewer than k rejected answers (None: mask the slots).
    """

    name = "data"
    needs_model = False

    def __init__(self, fill: NegativeGenerator | None = None):
        self.fill = fill

    def __call__(self, examples: Sequence[Example], k: int, generator: Generators, ranked: bool = False) -> Negatives:
        check_k("data", k)
        check_data_examples(examples)
        gens = per_example_generators(generator, len(examples))
        short = [b for b, e in enumerate(examples) if len(e.rejected_ids) < k]
        filled = {}
        if short and self.fill is not None:
            forks = fork([gens[b] for b in short], "data-fill")
            extra = self.fill([examples[b] for b in short], k, forks, ranked=ranked)
            filled = {b: (extra.ids[j], extra.valid[j], extra.sources[j]) for j, b in enumerate(short)}
        ids, valid, sources = [], [], []
        for b, e in enumerate(examples):
            row = [list(r) for r in e.rejected_ids[:k]]
            ok = [r != list(e.continuation_ids) for r in row]
            src = ["data"] * len(row)
            missing = k - len(row)
            if missing and b in filled:
                f_ids, f_valid, f_src = filled[b]
                row += [list(x) for x in f_ids[:missing]]
                ok += list(f_valid[:missing])
                src += list(f_src[:missing])
            elif missing:
                row += [list(e.continuation_ids)] * missing
                ok += [False] * missing
                src += ["data"] * missing
            ids.append(row)
            valid.append(ok)
            sources.append(src)
        scores = [[float(k - i) for i in range(k)] for _ in examples] if ranked else None
        return Negatives(ids=ids, valid=valid, scores=scores, sources=sources)


NO_TARGET = float("-inf")


def candidate_labels(
    examples: Sequence[Example], sources: Sequence[Sequence[str]], ranked: bool
) -> tuple[list[list[float]], list[list[float]]]:
    """Labels and targets (each B rows of K+1 floats, gold first) for the list losses of :mod:`seqcpo.losses`.

    Labels (higher = better, equal = tied) follow the column order, which is the ranking: gold, then the
    negatives as their generators and the spec order place them. Two exceptions make ties: neighbouring data
    columns (and the gold with the first of them) whose data scores are equal share a label, and without
    ``ranked`` the synthetic negatives (unordered then) share one label.

    Targets (the data's reward of each candidate, for ``infonca``/``nca``): with scores, the gold's and the data
    negatives' own scores and :data:`NO_TARGET` for synthetic ones; without scores, 0 for the gold and
    :data:`NO_TARGET` for every negative (one-hot on the gold).
    """
    labels, targets = [], []
    for e, row in zip(examples, sources):
        scores = e.scores
        n = len(row) + 1
        lab, tgt = [0.0], [float(scores[0]) if scores else 0.0]
        data_i, synthetic_label = 0, None
        prev_score = float(scores[0]) if scores else None
        for col, src in enumerate(row, start=1):
            label = float(-col)
            if src == "data":
                score = float(scores[1 + data_i]) if scores and 1 + data_i < len(scores) else None
                if score is not None and prev_score is not None and score == prev_score and lab[-1] is not None:
                    label = lab[-1]  # tied with the candidate before it in the data
                prev_score = score
                tgt.append(score if score is not None else NO_TARGET)
                data_i += 1
            else:
                prev_score = None
                if not ranked:
                    synthetic_label = label if synthetic_label is None else synthetic_label
                    label = synthetic_label
                tgt.append(NO_TARGET)
            lab.append(label)
        assert len(lab) == n
        labels.append(lab)
        targets.append(tgt)
    return labels, targets
