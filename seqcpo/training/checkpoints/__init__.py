"""Checkpoints a run can trust: who wrote them, whether they were finished and are intact, and that they hold
finite weights.

Guarantees, each closing a class of silent wrong results:

1. **Run identity** (:mod:`~seqcpo.training.checkpoints.identity`). Every ``checkpoint-N`` carries the run's
   resolved config and content digests of its data and starting model; a resume under other decisive settings is
   refused, naming each field and its two values, unless ``allow_config_change`` is set.
2. **Completeness and integrity** (:mod:`~seqcpo.training.checkpoints.markers`,
   :mod:`~seqcpo.training.checkpoints.resume`). A checkpoint is complete only when its marker, written last and
   atomically, lists every file with its size and sha256, and the files still match: ``resume_from_checkpoint:
   true`` takes the newest such checkpoint and skips torn or corrupted ones (with a warning); rotation
   (``save_total_limit``) counts and deletes only complete checkpoints of this run. A finished run stays finished
   (:func:`finished_step`).
3. **Writing** (:mod:`~seqcpo.training.checkpoints.saving`). Free disk is checked before each checkpoint; a failed
   write (a full disk included) stops the run with one line naming the folder and the space a checkpoint needs.
4. **Finite training** (:mod:`~seqcpo.training.checkpoints.guard`). :class:`NonFiniteGuard` stops training before
   the optimizer step when the loss or the gradient norm is NaN or infinite.
"""

from seqcpo.training.checkpoints.errors import CheckpointWriteError, NonFiniteError, TrainingStopped
from seqcpo.training.checkpoints.guard import NonFiniteGuard, finite_logs
from seqcpo.training.checkpoints.identity import (
    NOT_DECISIVE,
    data_fingerprint,
    identity_differences,
    identity_key,
    model_fingerprint,
    run_identity,
)
from seqcpo.training.checkpoints.markers import (
    COMPLETE_MARKER,
    list_checkpoints,
    newest_complete,
    read_marker,
    verify_checksums,
    write_complete_marker,
)
from seqcpo.training.checkpoints.resume import check_resumable, finished_step, newest_trusted, resolve_resume
from seqcpo.training.checkpoints.saving import (
    check_free_space,
    estimate_checkpoint_bytes,
    output_dir_lock,
    prepare_output_dir,
    probe_output_dir,
    rotate,
    save_complete_checkpoint,
    set_aside,
    trainer_identity,
)

__all__ = [
    "COMPLETE_MARKER", "NOT_DECISIVE", "CheckpointWriteError", "NonFiniteError", "NonFiniteGuard", "TrainingStopped",
    "check_free_space", "check_resumable", "data_fingerprint", "estimate_checkpoint_bytes", "finished_step",
    "finite_logs", "identity_differences", "identity_key", "list_checkpoints", "model_fingerprint", "newest_complete",
    "newest_trusted", "output_dir_lock", "prepare_output_dir", "probe_output_dir", "read_marker", "resolve_resume",
    "rotate", "set_aside",
    "run_identity", "save_complete_checkpoint", "trainer_identity", "verify_checksums", "write_complete_marker",
]
