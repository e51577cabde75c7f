"""The grid's weight stages: fixed negatives, training (or resolving an untrained model), interpolating an
ensemble, and making an arm's weights again where only its committed outputs are (a fresh clone)."""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from pathlib import Path

from seqcpo.grid.cache import cached_stage, write_done
from seqcpo.grid.spec import ArmSpec, EnsembleSpec, GridError
from seqcpo.grid.state import GridRun
from seqcpo.training.config import load_config

logger = logging.getLogger("seqcpo")


def negatives(run: GridRun, arm: ArmSpec) -> dict | None:
    """Stage 0 of an ``offline_negatives`` arm: ``seqcpo negatives`` with the arm's own config, once (the folder
    resumes by itself; its settings must match the arm's, which the trainer checks)."""
    if not arm.offline_negatives:
        return None
    folder, fp = run.negatives_dir(arm), run.train_fp(arm)

    def make() -> dict:
        from seqcpo.training import run as training_run

        logger.info("grid: %s: making fixed negatives into %s", arm.name, folder)
        cfg = load_config(None, {**arm.overrides, "output_dir": str(run.arm_dir(arm))}, where=f"arms.{arm.name}")
        t0 = time.perf_counter()
        made = training_run.make_negatives(cfg, str(folder))
        return write_done(folder, "negatives", fp, {"seconds": round(time.perf_counter() - t0, 1),
                                                    "examples": made["examples"], "shards": made["shards"]})

    return cached_stage(folder, fp, make, f"{arm.name}: negatives",
                        complete=lambda f: any(f.glob("*.parquet")))


def train(run: GridRun, arm: ArmSpec) -> dict:
    """Train the arm (its fixed negatives first), or record the untrained model's checkpoint."""
    run.train_done(arm)  # a trained arm finished with another config: refuse before anything else
    folder = run.arm_dir(arm)
    return cached_stage(folder, run.train_fp(arm), lambda: _train(run, arm, folder), f"{arm.name}: train")


def _train(run: GridRun, arm: ArmSpec, folder: Path) -> dict:
    if arm.kind == "model":
        from seqcpo.models import resolve_model_path

        ckpt = resolve_model_path(arm.config.model_name_or_path)
        return write_done(folder, "train", run.train_fp(arm),
                          {"checkpoint": ckpt, "steps": 0, "seconds": 0.0, "train_loss": None, "trained": False})
    from seqcpo.training import run as training_run

    negatives(run, arm)
    overrides = {**arm.overrides, "output_dir": str(folder)}
    if any(folder.glob("checkpoint-*")) and "resume_from_checkpoint" not in overrides:
        overrides["resume_from_checkpoint"] = "auto"  # an interrupted run: resume it (afresh if all are torn)
    logger.info("grid: %s: training", arm.name)
    # built again here, not from arm.config: mixed precision is checked on the machine that trains
    result = training_run.train(load_config(None, overrides, where=f"arms.{arm.name}"))
    info = {"checkpoint": result["final_checkpoint"], "steps": result["steps"], "seconds": result["seconds"],
            **({k: result[k]} if (k := "seconds_untimed_before_step") in result else {}),
            "train_loss": result["train_loss"], "trained": True, "examples": result["examples"]}
    del result
    gc.collect()
    return write_done(folder, "train", run.train_fp(arm), info)


def interpolate(run: GridRun, ens: EnsembleSpec, force: bool = False) -> dict:
    """The ensemble's checkpoints, one per alpha (:func:`seqcpo.ensemble.interpolate_checkpoints`)."""
    folder = run.ensemble_dir(ens.name)

    def make() -> dict:
        from seqcpo.ensemble import interpolate_checkpoints

        ends = {}
        for key in (ens.from_arm, ens.to_arm):
            if run.train_done(run.grid.arm(key)) is None:
                raise GridError(f"{run.grid.path}: ensemble {ens.name!r} needs arm {key!r} trained first; "
                                f"run it too (--only {key} ...)")
            ends[key] = weights(run, run.grid.arm(key))
        t0 = time.perf_counter()
        paths = interpolate_checkpoints(ends[ens.from_arm], ends[ens.to_arm], ens.alphas, folder)
        return write_done(folder, "ensemble", run.ensemble_fp(ens), {
            "checkpoints": {f"{a:g}": p for a, p in zip(ens.alphas, paths)}, "from": ends[ens.from_arm],
            "to": ends[ens.to_arm], "seconds": round(time.perf_counter() - t0, 1)})

    return cached_stage(folder, run.ensemble_fp(ens), make, f"ensemble {ens.name}", force=force)


def has_weights(path: str) -> bool:
    """Whether a checkpoint folder holds weights (safetensors or a .bin) here."""
    p = Path(path)
    return p.is_dir() and (any(p.glob("*.safetensors")) or any(p.glob("*.bin")))


def weights(run: GridRun, arm: ArmSpec) -> str:
    """The arm's checkpoint folder, made again when its stage finished elsewhere (a fresh clone holds the committed
    outputs, never weights): a trained arm is retrained (deterministic on CPU: the same weights), an ensemble
    re-interpolated, the untrained model resolved again."""
    if arm.kind == "control":
        return weights(run, run.grid.arm(arm.control.of))
    if arm.kind == "model":
        from seqcpo.models import resolve_model_path

        return resolve_model_path(arm.config.model_name_or_path)
    path = run.checkpoint(arm)
    if has_weights(path):
        return path
    if arm.kind == "ensemble":
        logger.info("grid: %s: ensemble weights not on this machine: interpolating again", arm.name)
        interpolate(run, run.ensemble(arm), force=True)
    else:
        with _weights_lock(run.arm_dir(arm), arm.name):
            if not has_weights(path):  # another worker may have made them while this one waited
                logger.info("grid: %s: weights not on this machine (only the stage's committed outputs are): "
                            "training again, which gives the same weights on CPU", arm.name)
                _retrain(run, arm, Path(path))
    return run.checkpoint(arm)


def _check_same_losses(name: str, committed: Path, history: list[dict], recorded: dict) -> None:
    """Warn when the retrain's logged step losses are not the committed run's (then its weights are not either):
    another torch build or thread count. Without a committed log, the recorded training loss is compared."""
    import json

    def losses(rows):
        return [(r.get("step"), r["loss"]) for r in rows if "loss" in r]

    try:
        before = losses(json.loads(committed.read_text()))
    except (OSError, ValueError):
        before = None
    now = losses(history)
    if before is None:  # no committed log: the recorded mean loss
        differ = None if recorded.get("train_loss") in (None, history[-1].get("train_loss")) else "train_loss"
    elif len(before) != len(now):
        differ = f"{len(before)} logged steps committed, {len(now)} now"
    else:
        differ = next((a for a, b in zip(before, now) if a != b), None)
    if differ:
        logger.warning("grid: %s: the retrain's training losses differ from the committed run's (first at %s): this "
                       "machine does not reproduce the run bit for bit (another torch build or thread count?); the "
                       "ensemble uses these weights", name, differ)


@contextlib.contextmanager
def _weights_lock(folder: Path, name: str):
    """One worker at a time makes an arm's weights; another that needs them (an ensemble's endpoint that a
    ``--weights`` worker is still training) waits for them instead of failing on the training lock."""
    try:
        import fcntl
    except ImportError:  # Windows: unguarded (the training lock still refuses a second run into the folder)
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".weights.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("grid: %s: another worker is making these weights: waiting for it", name)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _retrain(run: GridRun, arm: ArmSpec, dest: Path) -> None:
    """Train a finished arm again for its weights only: in a scratch folder beside its committed outputs (resumed
    there if interrupted), then only the final weights move to the recorded checkpoint path. The committed
    done.json, training log and quality samples stay those of the run that finished, so a retrain cut off half-way
    cannot leave them half-written; the retrain's logged step losses are checked against the committed log."""
    import shutil

    from seqcpo.training import run as training_run

    recorded = run.train_done(arm)
    negatives(run, arm)  # fixed negatives are not committed either: made again (the same rows)
    scratch = run.arm_dir(arm) / ".weights"
    overrides = {**arm.overrides, "output_dir": str(scratch)}
    if any(scratch.glob("checkpoint-*")):
        overrides["resume_from_checkpoint"] = "auto"
    result = training_run.train(load_config(None, overrides, where=f"arms.{arm.name}"))
    _check_same_losses(arm.name, run.arm_dir(arm) / "log_history.json", result["trainer"].state.log_history,
                       recorded)
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    Path(result["final_checkpoint"]).replace(dest)
    del result
    gc.collect()
    shutil.rmtree(scratch)
