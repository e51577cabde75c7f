"""Finite training: stop before the optimizer step when the loss or the gradient norm is NaN or infinite, so no
checkpoint (and no ``final/``) is written with broken weights, and keep non-finite values out of the logs."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from seqcpo.training.checkpoints.errors import NonFiniteError
from seqcpo.training.checkpoints.markers import newest_complete

logger = logging.getLogger("seqcpo")


def _as_float(x) -> float:
    if isinstance(x, torch.Tensor):
        return float(x.detach().float().reshape(-1)[0].item()) if x.numel() == 1 else float("nan")
    return float(x)


class NonFiniteGuard:
    """Stops training at the first NaN or infinite loss (any micro-batch) or gradient norm, before the optimizer
    step, on every process at once (the decision is reduced across processes, so none is left waiting)."""

    def __init__(self):
        self._bad_loss: float | None = None

    def note_loss(self, loss) -> None:
        """Record a micro-batch's loss (after its backward); the verdict comes with the step's gradient norm."""
        value = _as_float(loss)
        if not math.isfinite(value) and self._bad_loss is None:
            self._bad_loss = value

    def check(self, grad_norm, trainer) -> None:
        """Raise :class:`NonFiniteError` if this step's loss or gradient norm is not finite (anywhere)."""
        bad_loss, self._bad_loss = self._bad_loss, None
        norm = _as_float(grad_norm) if grad_norm is not None else 0.0
        flags = torch.tensor([float(bad_loss is not None), float(not math.isfinite(norm))])
        if trainer.args.world_size > 1:
            flags = trainer.accelerator.reduce(flags.to(trainer.args.device), reduction="sum").cpu()
        if flags.sum().item() == 0:
            return
        step = trainer.state.global_step + 1  # the step being taken; the last saved one is at most global_step
        what = []
        if flags[0] > 0:
            what.append(f"the loss is {bad_loss}" if bad_loss is not None
                        else "the loss is not finite on another process")
        if flags[1] > 0:
            what.append(f"the gradient norm is {norm}")
        last, _ = newest_complete(trainer.args.output_dir)
        raise NonFiniteError(
            f"training stopped at step {step}: {' and '.join(what)}; the step was not taken and nothing after it "
            "saved; " + (f"the last complete checkpoint is {last}" if last else "no checkpoint was written yet")
            + " (lower learning_rate, check beta, cpo_lambda and the data)"
        )


def finite_logs(logs: dict[str, Any]) -> dict[str, Any]:
    """``logs`` with every non-finite number replaced by None (shown as missing, never as a number)."""
    out = {}
    for k, v in logs.items():
        if isinstance(v, (float, int)) and not isinstance(v, bool) and not math.isfinite(v):
            logger.warning("metric %s is %s: logged as missing", k, v)
            v = None
        out[k] = v
    return out

