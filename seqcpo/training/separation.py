"""When do the negatives stop teaching? The step from which every negative is separated from the gold.

The pairwise signal of CPO saturates: once the policy ranks the gold above each of its negatives
(``rewards/accuracies`` near 1 in every logged step), the loss only widens margins that are already won.
This module finds that point in a run's ``log_history`` (a pure function, so a report can compute it
from a finished run) and a ``TrainerCallback`` that says it in the training log once, when it happens.

Rule: the negatives count as *separated* from the first step of the earliest run of ``window``
consecutive logged training steps whose ``rewards/accuracies`` are all >= ``threshold``.
Ways to keep them informative are listed in :data:`REMEDIES` (and in the README).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

from transformers import TrainerCallback

logger = logging.getLogger("seqcpo")

ACCURACY_KEY = "rewards/accuracies"
DEFAULT_WINDOW = 10
DEFAULT_THRESHOLD = 0.98

REMEDIES = (
    "negatives made by the policy and refreshed (--negatives_model policy --negatives_refresh_steps 1), "
    "harder mean-field negatives (a smaller --mn_c), or a mixture with autoregressive ones (--negatives an:2,tn:2)"
)


@dataclass(frozen=True)
class Separation:
    """The step from which negatives were separated (``None``: never) and what decided it."""

    step: int | None
    window: int
    threshold: float
    last_accuracy: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"separated_at_step": self.step, "window": self.window, "threshold": self.threshold,
                "last_accuracy": self.last_accuracy}


def _check(window: int, threshold: float) -> None:
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"separation window must be an integer >= 1, got {window!r}")
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and 0.0 < threshold <= 1.0):
        raise ValueError(f"separation threshold must be in (0, 1], got {threshold!r}")


def accuracy_curve(log_history: Sequence[dict]) -> list[tuple[int, float]]:
    """``(step, rewards/accuracies)`` of the logged training steps, in order (evaluation rows left out).

    >>> accuracy_curve([{"step": 1, "rewards/accuracies": 0.5}, {"step": 1, "eval_loss": 2.0}, {"step": 2}])
    [(1, 0.5)]
    """
    out = []
    for row in log_history:
        value = row.get(ACCURACY_KEY)
        if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        out.append((int(row.get("step", len(out))), float(value)))
    return out


def separation_onset(
    log_history: Sequence[dict], window: int = DEFAULT_WINDOW, threshold: float = DEFAULT_THRESHOLD
) -> Separation:
    """The first step of the earliest ``window`` consecutive logged steps with accuracy >= ``threshold``.

    >>> h = [{"step": s, "rewards/accuracies": a} for s, a in [(1, .5), (2, 1.), (3, 1.), (4, .9), (5, 1.), (6, 1.)]]
    >>> separation_onset(h, window=2, threshold=0.98).step
    2
    >>> separation_onset(h, window=3, threshold=0.98).step is None
    True
    """
    _check(window, threshold)
    curve = accuracy_curve(log_history)
    run_start, run_len = None, 0
    for step, acc in curve:
        if acc >= threshold:
            run_start = step if run_len == 0 else run_start
            run_len += 1
            if run_len >= window:
                return Separation(run_start, window, threshold, curve[-1][1])
        else:
            run_len = 0
    return Separation(None, window, threshold, curve[-1][1] if curve else None)


class SeparationMonitor(TrainerCallback):
    """Logs one warning when the negatives become separated (see the module docstring for the rule)."""

    def __init__(self, window: int = DEFAULT_WINDOW, threshold: float = DEFAULT_THRESHOLD):
        _check(window, threshold)
        self.window, self.threshold = window, threshold
        self.reported: int | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.reported is not None or not logs or ACCURACY_KEY not in logs:
            return
        found = separation_onset(state.log_history, self.window, self.threshold)
        if found.step is not None:
            self.reported = found.step
            if state.is_world_process_zero:
                logger.warning(
                    "negatives separated from step %d: rewards/accuracies >= %.2f over %d logged steps; "
                    "from here CPO only widens margins. To keep them informative: %s",
                    found.step, self.threshold, self.window, REMEDIES,
                )
