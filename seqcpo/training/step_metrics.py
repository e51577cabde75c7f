"""The logged metrics of a training step, pooled over its micro-batches and processes.

Every metric is kept as a ``(sum, count)`` pair (:func:`seqcpo.losses.preference_metric_sums` gives them for the
preference metrics), so one optimizer step's value is ``sum of sums / sum of counts`` over its micro-batches
and processes: the number one batch holding all the step's examples would give (docs/method.md, "The
objective": a step does not depend on how it was split). Training logs the mean of the finished steps' values
since the last log, as transformers does for ``loss``; evaluation pools the whole evaluation set.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from seqcpo.losses import PREFERENCE_METRICS

MODES = ("train", "eval")


def logged_metric_names(objective: str, uses_negatives: bool) -> list[str]:
    """The metrics ``objective`` logs (the same list on every process, so their sums can be all-reduced)."""
    if objective == "pss":
        return ["loss/mle", "pss/mix_fraction"]
    if not uses_negatives:
        return ["loss/mle"]
    return [*PREFERENCE_METRICS, "loss/mle", "loss/cpo", "negatives/dropped"]


class StepMetrics:
    """Open pools of ``{name: [sum, count]}`` per mode, and the training window of finished steps.

    Args:
        names: the metric names, in the order they are all-reduced.
        reduce: sums a float64 tensor over processes (e.g. ``accelerator.reduce(t, "sum")``); None on one process.
    """

    def __init__(self, names: Sequence[str], reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.names = list(names)
        self.reduce = reduce
        self._pool: dict[str, dict[str, list[float]]] = {m: {} for m in MODES}
        self._window = torch.zeros((2, len(self.names)), dtype=torch.float64)  # (sum of step values, steps)

    def add(self, mode: str, sums: Mapping[str, tuple[float, float]]) -> None:
        """Adds one micro-batch's ``name -> (sum, count)`` to the open pool of ``mode``."""
        pool = self._pool[mode]
        for name, (total, count) in sums.items():
            acc = pool.setdefault(name, [0.0, 0.0])
            acc[0] += float(total)
            acc[1] += float(count)

    def reset(self, mode: str) -> None:
        self._pool[mode] = {}

    def pooled(self, mode: str, device, extra: Sequence[float] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """``extra`` and this mode's (sums, counts), summed over processes in one all-reduce, and the pool
        emptied. Returns ``(extra (E,), sums_counts (2, M))``."""
        pool = self._pool[mode]
        rows = [[pool.get(n, (0.0, 0.0))[j] for n in self.names] for j in (0, 1)]
        t = torch.tensor([*extra, *rows[0], *rows[1]], dtype=torch.float64, device=device)
        if self.reduce is not None:
            t = self.reduce(t)
        self._pool[mode] = {}
        t = t.cpu()
        return t[: len(extra)], t[len(extra):].view(2, -1)

    def close_step(self, sums_counts: torch.Tensor) -> None:
        """Adds a finished step's values (sum / count, for the metrics it counted) to the training window."""
        total, count = sums_counts
        seen = count > 0
        self._window[0] += torch.where(seen, total / count.clamp(min=1), torch.zeros_like(total))
        self._window[1] += seen.double()

    def log_values(self, mode: str, device) -> dict[str, float]:
        """The values to log now, ``eval_``-prefixed in evaluation. Train: the open step is closed and the
        window's mean over its steps is returned (and the window emptied). Eval: the whole evaluation's pool."""
        _, sums_counts = self.pooled(mode, device)
        if mode == "train":
            self.close_step(sums_counts)
            total, count = self._window
            self._window = torch.zeros_like(self._window)
        else:
            total, count = sums_counts
        prefix = "eval_" if mode == "eval" else ""
        return {f"{prefix}{n}": round(t / c, 6) for n, t, c in zip(self.names, total.tolist(), count.tolist()) if c > 0}
