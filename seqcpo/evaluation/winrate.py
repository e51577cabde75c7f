"""Win rates from pairwise verdicts: a model against the gold continuation, or two models head to head.

Rules (the paper leaves them open; these are ours):

- **Both orders** (default): every item is judged twice, the candidate as A and as B. The two verdicts,
  read from the candidate's side, give the item's outcome when they agree (win/win = win, loss/loss =
  loss, tie/tie = tie); **any disagreement is a tie** (win/loss, and also win/tie or loss/tie), which
  cancels position bias. If either verdict failed, the item is **failed**.
- **Debiased log-odds** (``debias=True``: the local judge by default, both orders; the caller passes it from
  :class:`seqcpo.evaluation.config.JudgeConfig`): small local
  judges answer mostly by position, so the verdict pair is nearly always a disagreement. Instead the
  candidate's log-odds ``logp(its letter) - logp(the other letter)`` are summed over the two orders, so a
  constant position bias cancels exactly; the item is a win above ``tie_margin``, a loss below ``-tie_margin``,
  else a tie.
- **Random order** (``order="random"``): one verdict per item, the candidate's position drawn from a
  ``random.Random`` seeded by (seed, item key), so the draw does not depend on item order; the position
  is recorded per item.
- **Win rate** = (wins + 0.5 ties) / n, n = items that did not fail. Failed items are counted apart and
  never as losses.
- **95% interval**: the Wilson score interval with p = that win rate and n. For a score in [0, 1] with
  mean p the variance is at most p(1-p), so treating the tie-as-half score as a proportion is
  conservative (never narrower than the true interval would be under the normal approximation).
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Sequence

from seqcpo.evaluation.judges import PairwiseJudge, Verdict, judge_all

Z_95 = 1.959963984540054
ORDERS = ("both", "random")


@dataclass
class ItemResult:
    """The outcome of one item for the candidate: "win", "loss", "tie", or None (failed).

    ``positions`` lists where the candidate stood in each verdict ("A"/"B"), ``verdicts`` the raw winners
    ("A"/"B"/"tie"/None) in the same order, ``errors`` any judge errors.
    """

    id: str
    category: str | None
    outcome: str | None
    positions: list[str] = field(default_factory=list)
    verdicts: list[str | None] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class WinRate:
    """Win-rate summary. ``rate``/``ci_low``/``ci_high`` are None when n == 0."""

    wins: int
    losses: int
    ties: int
    failed: int
    n: int
    rate: float | None
    ci_low: float | None
    ci_high: float | None
    ci_method: str = "wilson95"

    def to_dict(self) -> dict:
        return asdict(self)


def wilson_interval(p: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``p`` observed over ``n`` items.

    center = (p + z^2/2n) / (1 + z^2/n);  half = z * sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n).
    """
    if n <= 0:
        raise ValueError("the Wilson interval needs n >= 1")
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def from_candidate_side(winner: str | None, position: str) -> str | None:
    """A verdict ("A"/"B"/"tie"/None) read from the side of the candidate standing at ``position``."""
    if winner is None:
        return None
    if winner == "tie":
        return "tie"
    return "win" if winner == position else "loss"


def combine_orders(as_a: str | None, as_b: str | None) -> str | None:
    """Outcome of an item judged in both orders (each already read from the candidate's side).

    >>> combine_orders("win", "win"), combine_orders("win", "loss"), combine_orders("win", "tie")
    ('win', 'tie', 'tie')
    >>> combine_orders("loss", None) is None
    True
    """
    if as_a is None or as_b is None:
        return None
    return as_a if as_a == as_b else "tie"


def debiased_outcome(verdicts: Sequence[Verdict], positions: Sequence[str], tie_margin: float = 0.0) -> str | None:
    """Outcome from a judge's answer log-probs summed over both orders (see the module docstring).

    Each verdict carries its answer log-probs ``logp = {"A": .., "B": .., "tie": ..}``; the candidate stood at
    ``positions[i]`` in verdict i. A verdict without them (an API judge's) fails the item.

    >>> v = lambda a, b: Verdict("A", logp={"A": a, "B": b, "tie": -9.0})
    >>> debiased_outcome([v(-0.1, -2.5), v(-0.2, -1.0)], ["A", "B"])  # +2.4 as A, -0.8 as B: net +1.6
    'win'
    """
    total = 0.0
    for v, pos in zip(verdicts, positions):
        if v.winner is None or v.logp is None:
            return None
        logp = v.logp
        other = "B" if pos == "A" else "A"
        total += logp[pos] - logp[other]
    if total > tie_margin:
        return "win"
    if total < -tie_margin:
        return "loss"
    return "tie"


def summarize(items: Sequence[ItemResult]) -> WinRate:
    wins = sum(i.outcome == "win" for i in items)
    losses = sum(i.outcome == "loss" for i in items)
    ties = sum(i.outcome == "tie" for i in items)
    failed = sum(i.outcome is None for i in items)
    n = wins + losses + ties
    if n == 0:
        return WinRate(wins, losses, ties, failed, 0, None, None, None)
    rate = (wins + 0.5 * ties) / n
    low, high = wilson_interval(rate, n)
    return WinRate(wins, losses, ties, failed, n, rate, low, high)


_SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def paired_difference(outcomes_a: dict[str, str | None], outcomes_b: dict[str, str | None],
                      resamples: int = 2000, seed: int = 0) -> dict | None:
    """Paired difference ``rate_a - rate_b`` of two models' win rates against the gold, per item (``{item id:
    outcome}``; score win 1, tie 0.5, loss 0; items failed for either model are left out), with its 95% paired
    bootstrap interval (:func:`seqcpo.evaluation.paired.paired_mean_difference`, which always stays within
    [-1, 1]). None without a common item; no interval from a single item.

    >>> d = paired_difference({"1": "win", "2": "win", "3": "tie"}, {"1": "loss", "2": "win", "3": "loss"})
    >>> d["n"], d["difference"], d["low"] >= -1.0 and d["high"] <= 1.0   # differences 1, 0, 0.5
    (3, 0.5, True)
    """
    from seqcpo.evaluation.paired import paired_mean_difference

    common = [k for k in outcomes_a if outcomes_a[k] in _SCORE and outcomes_b.get(k) in _SCORE]
    if not common:
        return None
    a = [_SCORE[outcomes_a[k]] for k in common]
    b = [_SCORE[outcomes_b[k]] for k in common]
    if len(common) == 1:
        return {"n": 1, "difference": a[0] - b[0], "low": None, "high": None}
    return paired_mean_difference(a, b, resamples=resamples, seed=seed).as_dict()


def summarize_by_category(items: Sequence[ItemResult]) -> dict[str, WinRate]:
    """Per-category summaries; empty when no item has a category."""
    groups: dict[str, list[ItemResult]] = defaultdict(list)
    for item in items:
        if item.category is not None:
            groups[str(item.category)].append(item)
    return {cat: summarize(group) for cat, group in sorted(groups.items())}


def judge_pairs(
    judge: PairwiseJudge,
    pairs: Sequence[dict],
    order: str = "both",
    seed: int = 0,
    progress: bool = True,
    debias: bool = False,
    tie_margin: float = 0.0,
) -> list[ItemResult]:
    """Judge candidate vs baseline for each pair.

    Each pair is a dict with ``key`` (unique, seeds the random order), ``id``, ``category``, ``prompt``,
    ``candidate`` and ``baseline`` texts. ``debias`` (with ``order="both"``): outcomes from the summed answer
    log-odds of the two orders, a tie within ``tie_margin`` (:func:`debiased_outcome`).
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    plans: list[list[str]] = []  # candidate positions per pair
    triples: list[tuple[str, str, str]] = []
    for pair in pairs:
        if order == "both":
            positions = ["A", "B"]
        else:
            positions = [random.Random(f"{seed}:{pair['key']}").choice("AB")]
        plans.append(positions)
        for pos in positions:
            a, b = (pair["candidate"], pair["baseline"]) if pos == "A" else (pair["baseline"], pair["candidate"])
            triples.append((pair["prompt"], a, b))
    verdicts: list[Verdict] = judge_all(judge, triples, progress=progress)
    results, k = [], 0
    for pair, positions in zip(pairs, plans):
        vs = verdicts[k:k + len(positions)]
        k += len(positions)
        sides = [from_candidate_side(v.winner, pos) for v, pos in zip(vs, positions)]
        if order == "both" and debias:
            outcome = debiased_outcome(vs, positions, tie_margin)
        else:
            outcome = combine_orders(*sides) if order == "both" else sides[0]
        results.append(ItemResult(
            id=str(pair["id"]),
            category=pair.get("category"),
            outcome=outcome,
            positions=positions,
            verdicts=[v.winner for v in vs],
            errors=[v.error for v in vs if v.error],
        ))
    return results


def win_rate_vs_gold(judge: PairwiseJudge, rows: Sequence[dict], order: str = "both", seed: int = 0,
                     progress: bool = True, debias: bool = False, tie_margin: float = 0.0) -> list[ItemResult]:
    """Judge generation rows (from :func:`generate_continuations`) against their gold ``reference``.

    The judge sees ``judge_prompt`` (falling back to ``prompt``) as the prompt."""
    pairs = [{
        "key": f"{r['id']}|{r['model']}|{r['decoding']}|gold",
        "id": r["id"],
        "category": r.get("category"),
        "prompt": r.get("judge_prompt") or r["prompt"],
        "candidate": r["generation"],
        "baseline": r["reference"],
    } for r in rows]
    return judge_pairs(judge, pairs, order=order, seed=seed, progress=progress, debias=debias, tie_margin=tie_margin)


def head_to_head(judge: PairwiseJudge, rows_x: Sequence[dict], rows_y: Sequence[dict], order: str = "both",
                 seed: int = 0, progress: bool = True, debias: bool = False,
                 tie_margin: float = 0.0) -> list[ItemResult]:
    """Model X (candidate) against model Y (baseline), matched on (id, decoding). Win = X preferred."""
    by_key = {(str(r["id"]), r["decoding"]): r for r in rows_y}
    pairs = []
    for r in rows_x:
        other = by_key.get((str(r["id"]), r["decoding"]))
        if other is None:
            continue
        pairs.append({
            "key": f"{r['id']}|{r['decoding']}|{r['model']}|{other['model']}",
            "id": r["id"],
            "category": r.get("category"),
            "prompt": r.get("judge_prompt") or r["prompt"],
            "candidate": r["generation"],
            "baseline": other["generation"],
        })
    if not pairs:
        raise ValueError("head-to-head: the two models share no (id, decoding) rows")
    return judge_pairs(judge, pairs, order=order, seed=seed, progress=progress, debias=debias, tie_margin=tie_margin)
