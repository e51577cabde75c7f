"""Paired bootstrap intervals for the difference between two models scored on the same items.

Both models generated a continuation for the same n items (same prefixes, same decoding), so their
scores are paired. A resample draws n item indices with replacement and recomputes *both* models'
statistic on those items; the interval is the percentile interval of the difference
``statistic(A) - statistic(B)`` over the resamples. Pairing removes the between-item variance that two
independent intervals would carry, which is what lets a few points of difference resolve.

Per-item statistics (repetition, ROUGE-L, embedding similarity) take the vectorised
:func:`paired_mean_difference`. Set-level statistics (distinct-n pools n-grams over the set; MAUVE compares two
feature clouds) cannot be resampled with replacement: a resample repeats about a third of its items, and a
repeated text adds n-grams but no new distinct ones (or a point to a cluster twice), so every resample is biased
low and the percentile interval can miss its own estimate (seen: distinct-2 +0.092 with interval [+0.054,
+0.070]). They take :func:`paired_statistic_difference`, a half-sampling interval instead: each resample draws
``n // 2`` items *without* replacement (no duplicates), and the spread of the difference over half-samples,
taken around its median, is placed around the full-set estimate. For a smooth statistic, the variance over
half-samples drawn without replacement from ``n`` items equals the variance of the full-set estimate to first order
(``m (n - 1) / (n (n - m))`` = about 1 at ``m = n / 2``), so no rescaling is needed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

DEFAULT_RESAMPLES = 1000


@dataclass(frozen=True)
class PairedDifference:
    """``a - b`` with its bootstrap interval over ``n`` paired items (percentile for per-item means,
    half-sampling for set-level statistics: see the module docstring)."""

    a: float
    b: float
    difference: float
    low: float
    high: float
    n: int
    resamples: int
    confidence: float

    @property
    def significant(self) -> bool:
        """True when the interval excludes zero."""
        return self.low > 0.0 or self.high < 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "significant": self.significant}


def _check(n: int, resamples: int, confidence: float) -> None:
    if n < 1:
        raise ValueError("paired bootstrap needs at least one item")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not (0.0 < confidence < 1.0):
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) item indices drawn with replacement; the same seed gives the same draws."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _interval(diffs: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(diffs, [tail, 1.0 - tail])
    return float(lo), float(hi)


def paired_mean_difference(
    a: Sequence[float], b: Sequence[float], resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
    confidence: float = 0.95,
) -> PairedDifference:
    """Mean of per-item scores ``a`` minus mean of ``b``, items paired by position.

    Items where either score is NaN (e.g. a text too short for any n-gram) are dropped from both.

    >>> d = paired_mean_difference([0.5, 0.7, 0.9], [0.4, 0.6, 0.8], resamples=200)
    >>> round(d.difference, 6), round(d.low, 6), round(d.high, 6)   # a constant shift has no spread
    (0.1, 0.1, 0.1)
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired scores need equal 1-D lengths, got {x.shape} and {y.shape}")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    _check(len(x), resamples, confidence)
    idx = bootstrap_indices(len(x), resamples, seed)
    diffs = x[idx].mean(axis=1) - y[idx].mean(axis=1)
    lo, hi = _interval(diffs, confidence)
    return PairedDifference(float(x.mean()), float(y.mean()), float(x.mean() - y.mean()), lo, hi, len(x),
                            resamples, confidence)


def paired_statistic_difference(
    statistic_a: Callable[[np.ndarray], float], statistic_b: Callable[[np.ndarray], float], n: int,
    resamples: int = DEFAULT_RESAMPLES, seed: int = 0, confidence: float = 0.95,
) -> PairedDifference:
    """A set-level statistic of model A minus model B; each callable scores a 1-D array of item indices.

    The interval is the half-sampling one of the module docstring: ``low, high = estimate + quantiles of
    (half-sample difference - its median)``, so it always holds the estimate when the spread is symmetric about
    its median.

    >>> texts_a, texts_b = ["x y"] * 4, ["x x"] * 4
    >>> from seqcpo.evaluation.metrics import distinct_n
    >>> d = paired_statistic_difference(lambda i: distinct_n([texts_a[j] for j in i], 1),
    ...                                 lambda i: distinct_n([texts_b[j] for j in i], 1), n=4, resamples=50)
    >>> d.difference, d.significant    # 2 unique of 8 words against 1 of 8, on every resample
    (0.125, True)
    """
    _check(n, resamples, confidence)
    full = np.arange(n)
    a0, b0 = float(statistic_a(full)), float(statistic_b(full))
    diffs = np.empty(resamples)
    for r, idx in enumerate(half_sample_indices(n, resamples, seed)):
        diffs[r] = float(statistic_a(idx)) - float(statistic_b(idx))
    finite = diffs[np.isfinite(diffs)]
    if len(finite) == 0:
        raise ValueError("every bootstrap resample gave a non-finite statistic")
    lo, hi = _interval(finite - np.median(finite), confidence)
    return PairedDifference(a0, b0, a0 - b0, a0 - b0 + lo, a0 - b0 + hi, n, len(finite), confidence)


def half_sample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, max(1, n // 2)) item indices, each row drawn without replacement (no item twice)."""
    rng = np.random.default_rng(seed)
    m = max(1, n // 2)
    return np.stack([rng.permutation(n)[:m] for _ in range(resamples)])


def seed_spread(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation, min and max of one score over training seeds.

    >>> seed_spread([0.3, 0.5, 0.4])["std"]
    0.1
    """
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    std = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
    return {"n": len(v), "mean": float(np.mean(v)), "std": round(std, 12), "min": min(v), "max": max(v)}


# ----------------------------------------------------------------------------- one model against a baseline

PER_ITEM_METRICS = ("rep_3", "rep_4", "rouge_l", "similarity")
DISTINCT_NS = (1, 2, 3)


def _distinct_statistic(texts: Sequence[str], n: int) -> Callable[[np.ndarray], float]:
    """distinct-n of the items picked by an index array, each text's n-grams counted once up front."""
    from seqcpo.evaluation.metrics import _ngrams, words

    grams = [_ngrams(words(t), n) for t in texts]
    uniq, counts = [set(g) for g in grams], np.array([len(g) for g in grams])

    def stat(idx: np.ndarray) -> float:
        total = int(counts[idx].sum())
        return len(set().union(*(uniq[i] for i in idx))) / total if total else 0.0

    return stat


def _mauve_statistic(gold: np.ndarray, gen: np.ndarray) -> Callable[[np.ndarray], float]:
    """MAUVE of the picked items (gold and model resampled together), with MAUVE's own default seed so the
    full-set value is the one the report's table shows."""
    import logging

    from seqcpo.evaluation.metrics import mauve_score

    quiet = logging.getLogger("seqcpo.evaluation.metrics")

    def stat(idx: np.ndarray) -> float:
        level, quiet.level = quiet.level, logging.ERROR  # the small-sample warning once per set, not per resample
        try:
            return mauve_score(gold[idx], gen[idx]).score
        finally:
            quiet.setLevel(level)

    return stat


def compare_to_baseline(a: dict, b: dict, resamples: int = DEFAULT_RESAMPLES, mauve_resamples: int = 200,
                        seed: int = 0, confidence: float = 0.95) -> dict[str, dict]:
    """Every paired difference of model A against baseline B on one decoding, over the items both have.

    ``a`` / ``b``: ``{"per_item": {"id": [...], metric: [...]}, "texts": [...], "gold_features": (N, D) |
    None, "features": (N, D) | None}``, rows in ``per_item["id"]`` order (``seqcpo.evaluation.evaluate.
    per_item_scores``). Per-item metrics (:data:`PER_ITEM_METRICS`) take :func:`paired_mean_difference`;
    distinct-n and MAUVE (gold and both models' features resampled together; ``mauve_resamples``, 0 = off,
    since each MAUVE call costs ~0.2 s) take :func:`paired_statistic_difference`.

    Returns ``{metric: PairedDifference.as_dict()}``; metrics either side lacks are left out.
    """
    ids_b = {i: k for k, i in enumerate(b["per_item"]["id"])}
    pairs = [(k, ids_b[i]) for k, i in enumerate(a["per_item"]["id"]) if i in ids_b]
    if not pairs:
        raise ValueError("the two models share no item ids: nothing to pair")
    ia, ib = (np.array(x) for x in zip(*pairs))
    out: dict[str, dict] = {}
    for m in PER_ITEM_METRICS:
        xa, xb = a["per_item"].get(m), b["per_item"].get(m)
        if xa is None or xb is None:
            continue
        fa = np.array([np.nan if v is None else v for v in xa], dtype=np.float64)[ia]
        fb = np.array([np.nan if v is None else v for v in xb], dtype=np.float64)[ib]
        if (~(np.isnan(fa) | np.isnan(fb))).any():
            out[m] = paired_mean_difference(fa, fb, resamples, seed, confidence).as_dict()
    ta, tb = [a["texts"][k] for k in ia], [b["texts"][k] for k in ib]
    for n in DISTINCT_NS:
        out[f"distinct_{n}"] = paired_statistic_difference(
            _distinct_statistic(ta, n), _distinct_statistic(tb, n), len(pairs), resamples, seed, confidence).as_dict()
    if mauve_resamples and a.get("features") is not None and b.get("features") is not None:
        gold = np.asarray(a["gold_features"])[ia]
        fa, fb = np.asarray(a["features"])[ia], np.asarray(b["features"])[ib]
        out["mauve"] = paired_statistic_difference(
            _mauve_statistic(gold, fa), _mauve_statistic(gold, fb), len(pairs), mauve_resamples, seed,
            confidence).as_dict()
    return out
