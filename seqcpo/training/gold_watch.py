"""Is the gold's own likelihood falling? A warning users of DPO-style losses need.

A contrastive loss only asks the gold to beat its negatives: the margin can grow while the gold's own
log-probability falls (both fall, the negatives faster). docs/method.md ("Preference data") keeps the MLE term
for this reason; with ``mle_weight: 0`` or a small one the fall is common.

Rule: the *start* is the mean ``logps/chosen`` of the first ``window`` logged training steps; from then on, the
mean of the latest ``window`` logged steps is compared with it, and the first time it lies more than ``max_drop``
nats below, one warning names the step. Every logged row from the start on gets ``logps/chosen_delta`` (the
latest window's mean minus the start) in ``log_history``. A pure function (:func:`gold_drop`) finds the same
step in a finished run's ``log_history``.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

from transformers import TrainerCallback

logger = logging.getLogger("seqcpo")

KEY = "logps/chosen"
DELTA_KEY = "logps/chosen_delta"


def _check(window: int, max_drop: float) -> None:
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"gold_logp_window must be an integer >= 1, got {window!r}")
    if not (isinstance(max_drop, (int, float)) and math.isfinite(max_drop) and max_drop > 0):
        raise ValueError(f"gold_logp_max_drop must be a finite number > 0, got {max_drop!r}")


def chosen_curve(log_history: Sequence[dict]) -> list[tuple[int, float]]:
    """``(step, logps/chosen)`` of the logged training steps (evaluation rows have ``eval_`` names)."""
    out = []
    for row in log_history:
        v = row.get(KEY)
        if isinstance(v, (int, float)) and math.isfinite(v):
            out.append((int(row.get("step", len(out))), float(v)))
    return out


def deltas(values: Sequence[float], window: int) -> list[float | None]:
    """For each value, the mean of the latest ``window`` values minus the start (mean of the first ``window``);
    None before ``window`` values exist.

    >>> deltas([0.0, -2.0, -4.0, -6.0], window=2)
    [None, 0.0, -2.0, -4.0]
    """
    out: list[float | None] = []
    for i in range(len(values)):
        if i + 1 < window:
            out.append(None)
            continue
        start = sum(values[:window]) / window
        latest = sum(values[i + 1 - window: i + 1]) / window
        out.append(latest - start)
    return out


def gold_drop(log_history: Sequence[dict], window: int, max_drop: float) -> int | None:
    """The first logged step whose window mean lies more than ``max_drop`` below the start; None: never.

    >>> gold_drop([{"step": s, KEY: v} for s, v in [(1, 0.), (2, 0.), (3, -3.), (4, -9.)]], 2, 5.0)
    4
    """
    _check(window, max_drop)
    curve = chosen_curve(log_history)
    for (step, _), d in zip(curve, deltas([v for _, v in curve], window)):
        if d is not None and d < -max_drop:
            return step
    return None


class GoldLikelihoodMonitor(TrainerCallback):
    """Adds ``logps/chosen_delta`` to the logged rows and warns once when the gold's log-prob falls (module rule)."""

    def __init__(self, window: int = 5, max_drop: float = 5.0):
        _check(window, max_drop)
        self.window, self.max_drop = window, max_drop
        self.values: list[float] = []
        self.reported: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        # a resumed run: the start and the latest window come from the checkpoint's log history, so the deltas
        # and the one warning are those of the uninterrupted run
        self.values = [v for _, v in chosen_curve(state.log_history)] if state.global_step else []
        self.reported = gold_drop(state.log_history, self.window, self.max_drop) if self.values else None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or KEY not in logs or not math.isfinite(float(logs[KEY])):
            return
        self.values.append(float(logs[KEY]))
        d = deltas(self.values, self.window)[-1]
        if d is None:
            return
        logs[DELTA_KEY] = round(d, 6)
        if state.log_history and state.log_history[-1].get(KEY) == logs[KEY]:
            state.log_history[-1][DELTA_KEY] = round(d, 6)
        if self.reported is None and d < -self.max_drop:
            self.reported = state.global_step
            if state.is_world_process_zero:
                logger.warning(
                    "the gold's own log-probability is falling: logps/chosen averaged %.3f over the last %d logged "
                    "steps, %.3f below its start (%d logged steps) at step %d, while the loss may still improve its "
                    "margins. Raise mle_weight, lower the learning rate or beta, or try objective nca (it pushes "
                    "the gold's own reward up)",
                    sum(self.values[-self.window:]) / self.window, self.window, -d, self.window, state.global_step,
                )
