"""The errors that stop a run: one line saying why, where, and what was kept."""

from __future__ import annotations


class TrainingStopped(RuntimeError):
    """Training cannot go on; the one-line message says why, where, and what was kept."""


class NonFiniteError(TrainingStopped):
    """Training met a NaN or infinite loss or gradient norm; the message names the step."""


class CheckpointWriteError(TrainingStopped):
    """A checkpoint could not be written (disk full, folder removed, ...); the message names ``output_dir``."""

