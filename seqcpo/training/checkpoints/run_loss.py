"""The whole run's mean training loss across a resume, and this call's logging/eval/save intervals.

transformers reports ``train_loss`` as the mean over the steps of one ``train()`` call: a run resumed at step s
reported the mean of steps s+1..N, a different number from the uninterrupted run's (the grid compares a retrain's
loss with the recorded one). Each checkpoint stores the summed step losses so far in ``trainer_state.json``
(under ``stateful_callbacks``, as transformers stores callbacks' states); a resumed run starts its sum there and
reports the sum over the run's steps. With checkpoints at logging steps (``save_steps`` a multiple of
``logging_steps``) the sums are added in the uninterrupted run's order: the same float, bit for bit.
"""

from __future__ import annotations

import logging

from transformers import TrainerCallback

logger = logging.getLogger("seqcpo")

#: the key in ``trainer_state.json`` ``stateful_callbacks``
KEY = "SeqCPORunLoss"


def store(trainer) -> None:
    """Put the run's loss sum so far into the state the checkpoint is about to write."""
    pending = trainer._tr_loss.item() if getattr(trainer, "_tr_loss", None) is not None else 0.0
    total = getattr(trainer, "_total_loss_scalar", 0.0) + pending
    trainer.state.stateful_callbacks[KEY] = {"args": {}, "attributes": {"loss_sum": total,
                                                                        "step": trainer.state.global_step}}


def current_intervals(args, state) -> None:
    """A resumed run logs, evaluates and saves at this call's ``logging_steps``/``eval_steps``/``save_steps``.

    transformers restores them from the checkpoint's ``trainer_state.json`` (and only warns that they differ), so a
    run resumed with ``--save_steps 25`` after ``--save_steps 100`` still saved every 100 steps. They decide what
    is logged and saved, never the weights (they leave every random draw alone), so this call's values apply.
    """
    before = (state.logging_steps, state.eval_steps, state.save_steps)
    state.compute_steps(args, state.max_steps)
    after = (state.logging_steps, state.eval_steps, state.save_steps)
    if after != before:
        logger.info("resumed at step %d with this run's intervals: logging/eval/save every %s steps (the "
                    "checkpoint had %s)", state.global_step, "/".join(map(str, after)),
                    "/".join(map(str, before)))


class RunLossCarry(TrainerCallback):
    """On a resume, starts the trainer's loss sum at the checkpoint's (``carried``: the run's whole mean can be
    reported); a checkpoint without one (an older seqcpo) leaves the mean over this call's steps, said once.
    The resumed run keeps this call's bookkeeping intervals (:func:`current_intervals`)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.carried = True

    def on_train_begin(self, args, state, control, **kwargs):
        self.carried = True
        if state.global_step == 0:
            return
        current_intervals(args, state)
        stored = (state.stateful_callbacks or {}).get(KEY)
        attrs = stored.get("attributes", {}) if isinstance(stored, dict) else {}
        if attrs.get("step") == state.global_step and isinstance(attrs.get("loss_sum"), (int, float)):
            self.trainer._total_loss_scalar = float(attrs["loss_sum"])
        else:
            self.carried = False
            logger.info("the checkpoint at step %d holds no loss sum (written by an older seqcpo): train_loss is "
                        "the mean over the steps after it", state.global_step)

    def whole_run_loss(self, logs: dict) -> None:
        """The final metrics row (``train_loss`` beside ``train_runtime``): the run's mean over all its steps."""
        if self.carried and "train_loss" in logs and "train_runtime" in logs:
            logs["train_loss"] = self.trainer._total_loss_scalar / max(self.trainer.state.global_step, 1)
