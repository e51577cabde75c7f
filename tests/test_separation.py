"""Saturated negatives are visible: the separation rule on hand-written histories and through a callback."""

from __future__ import annotations

import logging

import pytest
from transformers import TrainerControl, TrainerState

from seqcpo.training.separation import SeparationMonitor, accuracy_curve, separation_onset


def _history(accs, start=1):
    rows = []
    for i, a in enumerate(accs):
        rows.append({"step": start + i, "loss": 1.0, "rewards/accuracies": a})
        rows.append({"step": start + i, "eval_loss": 0.5})  # evaluation rows carry no accuracy
    return rows


def test_onset_is_first_step_of_first_full_window():
    h = _history([0.5, 0.99, 1.0, 0.97, 0.99, 1.0, 1.0, 0.2])
    # window 3 at threshold 0.98: steps 5, 6, 7 are the first three in a row
    assert separation_onset(h, window=3, threshold=0.98).step == 5
    # a lower threshold lets step 2..4 count
    assert separation_onset(h, window=3, threshold=0.95).step == 2
    s = separation_onset(h, window=4, threshold=0.98)
    assert s.step is None and s.last_accuracy == 0.2


def test_curve_skips_missing_and_non_finite():
    h = [{"step": 1, "rewards/accuracies": float("nan")}, {"step": 2, "loss": 3.0}, {"step": 3, "rewards/accuracies": 1}]
    assert accuracy_curve(h) == [(3, 1.0)]


@pytest.mark.parametrize("window,threshold", [(0, 0.9), (2, 0.0), (2, 1.5), (2, float("nan"))])
def test_bad_settings_are_refused(window, threshold):
    with pytest.raises(ValueError, match="separation"):
        separation_onset([], window=window, threshold=threshold)


def test_monitor_warns_once(caplog):
    mon = SeparationMonitor(window=2, threshold=0.98)
    state, control = TrainerState(), TrainerControl()
    with caplog.at_level(logging.WARNING, logger="seqcpo"):
        for step, acc in enumerate([0.6, 1.0, 1.0, 1.0, 1.0], start=1):
            logs = {"loss": 1.0, "rewards/accuracies": acc}
            state.global_step = step
            state.log_history.append({**logs, "step": step})
            mon.on_log(None, state, control, logs=logs)
    warnings = [r for r in caplog.records if "negatives separated" in r.getMessage()]
    assert len(warnings) == 1 and "from step 2" in warnings[0].getMessage()
    assert mon.reported == 2
