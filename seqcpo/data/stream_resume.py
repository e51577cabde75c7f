"""Resuming a training stream where it stopped: the positions a checkpoint stores, and the checks a resume makes.

:class:`StreamPositionCallback` stores every process's stream position (pass, record, window, reader state) in the
checkpoint's ``trainer_state.json`` and puts a resumed stream back there (:mod:`seqcpo.data.streaming`, "Resume
without replay"). :func:`check_stream_resume` refuses, before any model or data is loaded and in one line, a resume
that could not continue the stream: another number of processes, or another number of examples per step.
"""

from __future__ import annotations

from typing import Any, Optional

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from seqcpo.data.config import DataError
from seqcpo.data.streaming import StreamingExamples


#: The training stream of this process, for a callback the Trainer rebuilds from its stored state.
_ACTIVE_STREAM: Optional["StreamingExamples"] = None


class StreamPositionCallback(TrainerCallback, ExportableState):
    """Stores every process's stream position in the checkpoint (``trainer_state.json``, under
    ``stateful_callbacks``) and puts a resumed stream back there, so a resumed run reads on where the
    interrupted one stopped, with no replay. Examples consumed per process at step s:
    s * gradient_accumulation_steps * per-device batch size (the stream never ends a pass early)."""

    def __init__(self, dataset: StreamingExamples | None = None):
        global _ACTIVE_STREAM
        if dataset is None:  # rebuilt by the Trainer (restore_callback_states_from_checkpoint): this process's stream
            if _ACTIVE_STREAM is None:
                raise DataError("StreamPositionCallback needs the training stream (StreamingExamples)")
            dataset = _ACTIVE_STREAM
        _ACTIVE_STREAM = dataset
        self.dataset = dataset
        self.positions: list[dict] | None = None

    def state(self) -> dict:
        return {"args": {}, "attributes": {"positions": self.positions}}

    def _consumed(self, args, state) -> int:
        # this run's batch (a resumed state holds the checkpoint's train_batch_size, not this run's)
        return state.global_step * args.gradient_accumulation_steps * args.train_batch_size

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            return
        stored = (state.stateful_callbacks or {}).get(type(self).__name__)
        positions = (stored or {}).get("attributes", {}).get("positions") if isinstance(stored, dict) else None
        if not positions:
            raise DataError(
                f"the checkpoint at step {state.global_step} holds no stream position (was it written by a run "
                "without streaming?); resume it with streaming=false, or start a new output_dir"
            )
        if len(positions) != self.dataset.world_size:
            self.dataset.resume({"world_size": len(positions)})  # raises: another number of processes
        pos = positions[self.dataset.process_index]
        expected = self._consumed(args, state)
        if pos["examples"] != expected:
            raise DataError(_count_mismatch(state.global_step, pos["examples"], expected,
                                            args.gradient_accumulation_steps, args.train_batch_size))
        self.dataset.resume(pos)
        self.positions = positions

    def _capture(self, args, state, control):
        if not control.should_save:
            return
        pos = self.dataset.position(self._consumed(args, state))
        import torch.distributed as dist

        if self.dataset.world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, pos)
            self.positions = gathered
        else:
            self.positions = [pos]

    def on_step_end(self, args, state, control, **kwargs):
        self._capture(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._capture(args, state, control)

    def on_train_end(self, args, state, control, **kwargs):
        self.dataset.log_counts("training done")


def _count_mismatch(step: int, stored: int, expected: int, accumulation: int, batch: int) -> str:
    return (
        f"the checkpoint's stream stopped after {stored} examples per process at step {step}, but this run's "
        f"settings read {expected} per process by step {step} ({step} steps x gradient_accumulation_steps "
        f"{accumulation} x per_device_train_batch_size {batch}): resume with the batch settings the checkpoint was "
        "written with"
    )


def check_stream_resume(checkpoint: str, cfg) -> None:
    """Before anything is loaded: a streaming resume from ``checkpoint`` needs its stream positions, the same
    number of processes and the same examples per process and step. One-line :class:`DataError` otherwise (the
    same checks run again when training starts, on the stored state)."""
    import json
    import os

    try:
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as fh:
            state = json.load(fh)
    except (OSError, ValueError) as e:
        raise DataError(f"{checkpoint}/trainer_state.json: unreadable ({e}); resume from another checkpoint") from None
    stored = (state.get("stateful_callbacks") or {}).get(StreamPositionCallback.__name__)
    positions = (stored or {}).get("attributes", {}).get("positions") if isinstance(stored, dict) else None
    step = int(state.get("global_step") or 0)
    if not positions:
        raise DataError(
            f"{checkpoint} (step {step}) holds no stream position (was it written by a run without streaming?); "
            "resume it with streaming=false, or start a new output_dir"
        )
    if len(positions) != cfg.world_size:
        raise DataError(
            f"{checkpoint}: its stream was read by {len(positions)} process(es), this run has {cfg.world_size}: "
            "streaming resumes need the same number of processes (each reads its own shard); launch "
            f"{len(positions)} process(es), or start a new output_dir"
        )
    expected = step * cfg.gradient_accumulation_steps * cfg.train_batch_size
    got = positions[min(cfg.process_index, len(positions) - 1)].get("examples")
    if got != expected:
        raise DataError(_count_mismatch(step, got, expected, cfg.gradient_accumulation_steps, cfg.train_batch_size))
