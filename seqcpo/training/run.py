"""What ``seqcpo train`` and ``seqcpo negatives`` do, as functions (the CLI only parses arguments)."""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import torch
from transformers import set_seed

from seqcpo.data import load_splits, model_context_tokens
from seqcpo.models import apply_lora, load_model, load_tokenizer, resolve_model_path
from seqcpo.training.checkpoints import (
    finished_step,
    output_dir_lock,
    prepare_output_dir,
    resolve_resume,
    run_identity,
    write_complete_marker,
)
from seqcpo.training.config import SeqCPOConfig, save_config

logger = logging.getLogger("seqcpo")


def _load(cfg: SeqCPOConfig):
    from seqcpo.models.loading import ModelNotFoundError

    try:
        path = resolve_model_path(cfg.model_name_or_path)
        tokenizer = load_tokenizer(path, trust_remote_code=cfg.trust_remote_code)
        model = load_model(
            path,
            dtype=cfg.model_dtype,
            trust_remote_code=cfg.trust_remote_code,
            attn_implementation=cfg.attn_implementation,
            gradient_checkpointing=cfg.gradient_checkpointing,
        )
    except ModelNotFoundError as e:  # the setting that named it
        raise ModelNotFoundError(f"model_name_or_path: {e}") from None
    return path, tokenizer, model


def train(cfg: SeqCPOConfig, callbacks: list | None = None, output_dir_option: str = "output_dir") -> dict[str, Any]:
    """Train per ``cfg``; returns where everything went (output folder, final checkpoint, config, logs).

    Before anything is loaded: ``output_dir`` is checked writable (an error names ``output_dir_option``: the
    setting, or ``--output_dir`` when the value came from the command line) and held for this run (a second run
    into it is refused, :func:`~seqcpo.training.checkpoints.output_dir_lock`), and a resume is resolved to a
    complete, intact checkpoint written by this run's settings (:mod:`seqcpo.training.checkpoints`). A resume of
    a run that already reached its length trains nothing (:mod:`seqcpo.training.finished`). ``callbacks``: extra
    ``transformers.TrainerCallback`` objects. Raises :class:`~seqcpo.training.checkpoints.NonFiniteError` when
    the loss or the gradient norm stops being finite (the last good checkpoint stays; ``final/`` is not written).
    """
    prepare_output_dir(cfg.output_dir, output_dir_option)
    with output_dir_lock(cfg.output_dir, output_dir_option):  # one run at a time into a folder
        return _train(cfg, callbacks)


def _train(cfg: SeqCPOConfig, callbacks: list | None) -> dict[str, Any]:
    from seqcpo.training.quality import attach_quality, wants_quality
    from seqcpo.training.separation import separation_onset

    t0 = time.time()
    identity, resume, finished = _before_loading(cfg)
    if finished is not None:
        return finished
    before, untimed = _seconds_before(resume)
    set_seed(cfg.seed)
    path, tokenizer, model = _load(cfg)
    splits, train_ds, eval_ds, offline, offline_meta = _datasets(cfg, tokenizer, model)
    if cfg.lora:
        model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           target_modules=cfg.lora_target_modules)
    trainer = _trainer(cfg, model, tokenizer, train_ds, eval_ds, (offline, offline_meta), callbacks, identity)
    trainer.seqcpo_seconds = lambda: round(before + time.time() - t0, 1)  # across resumes; in every checkpoint
    trainer.seqcpo_untimed = untimed  # carried into every checkpoint's marker with the seconds
    if wants_quality(cfg):  # quality/* metrics every eval_steps (seqcpo.training.quality)
        attach_quality(trainer, cfg, {"validation": splits.validation, "test": splits.test})
    config_path = os.path.join(cfg.output_dir, "seqcpo_config.yaml")
    if trainer.is_world_process_zero():
        _set_aside_other_final(cfg.output_dir, identity)
        save_config(cfg, config_path)
    result = trainer.train(resume_from_checkpoint=resume)
    final_dir = os.path.join(cfg.output_dir, "final")
    _write_final(trainer, final_dir, tokenizer, identity)
    seconds = trainer.seqcpo_seconds()
    if trainer.is_world_process_zero():
        from seqcpo.io import atomic_write_json

        atomic_write_json(os.path.join(cfg.output_dir, "log_history.json"), trainer.state.log_history)
        atomic_write_json(
            os.path.join(cfg.output_dir, "run_info.json"),
            {
                "world_size": trainer.args.world_size,
                "distributed_type": str(trainer.accelerator.distributed_type),
                "steps": trainer.state.global_step,
                "train_loss": result.training_loss,
                "seconds": seconds,
                **untimed,
                "model_path": path,
                # the step from which every negative was separated (None: never; seqcpo.training.separation)
                "separated_at_step": separation_onset(trainer.state.log_history).step,
                "examples": _example_counts(cfg, splits),
            },
        )
    _end_process_group()
    return {
        "output_dir": cfg.output_dir,
        "final_checkpoint": final_dir,
        "config": config_path,
        "log_history": os.path.join(cfg.output_dir, "log_history.json"),
        "train_loss": result.training_loss,
        "steps": trainer.state.global_step,
        "seconds": seconds,
        **untimed,
        "examples": _example_counts(cfg, splits),
        "model_path": path,
        "trainer": trainer,
    }


def _seconds_before(resume: str | None) -> tuple[float, dict]:
    """The seconds the run took up to the checkpoint it resumes from (its marker's), and
    ``{"seconds_untimed_before_step": step}`` when the steps before ``step`` were never timed (a checkpoint written
    by an older seqcpo, or one resumed from such: ``seconds`` then count from there, and every later checkpoint
    carries the note on)."""
    if resume is None:
        return 0.0, {}
    from seqcpo.training.checkpoints import read_marker

    marker = read_marker(resume) or {}
    untimed = marker.get("seconds_untimed_before_step")
    if isinstance(marker.get("seconds"), (int, float)):
        return float(marker["seconds"]), ({"seconds_untimed_before_step": untimed} if untimed is not None else {})
    return 0.0, {"seconds_untimed_before_step": marker.get("step")}


def preflight(cfg: SeqCPOConfig, world_size: int | None = None,
              resume_here: bool = True) -> tuple[dict, str | None, int | None]:
    """``(identity, checkpoint to resume from or None, its step when the run already reached its length or
    None)``: every check that needs no model or data, read-only (``seqcpo train --dry-run`` makes the same):
    streaming's needs, the resume (its settings, completeness and stream position) and the fixed negatives'
    folder (finished, made under these settings; its shards are checked when they are read).

    ``world_size``: the processes to judge the resume for (the dry run, one process, judges a checkpoint for the
    processes that wrote it); ``resume_here``: False when ``output_dir`` is not on this machine (no resume)."""
    if cfg.streaming:
        from seqcpo.data.streaming import check_streaming_args

        check_streaming_args(cfg.max_steps)  # before loading the model: a missing max_steps fails at once
    identity = run_identity(cfg, world_size or cfg.world_size)
    resume = resolve_resume(cfg, identity) if resume_here else None
    done = finished_step(cfg, resume) if resume is not None else None
    if resume is not None and done is None and cfg.streaming and world_size in (None, cfg.world_size):
        from seqcpo.data.stream_resume import check_stream_resume

        check_stream_resume(resume, cfg)  # another number of processes or batch: refused before any loading
    if cfg.negatives_path and cfg.uses_negatives and done is None:
        from seqcpo.training.offline_reader import check_offline_settings

        check_offline_settings(cfg.negatives_path, cfg)
    return identity, resume, done


def _before_loading(cfg: SeqCPOConfig):
    """``(identity, checkpoint to resume from or None, the result of a run already finished or None)``, checked
    before any model or data is loaded (the output folder is checked by :func:`train`): :func:`preflight`."""
    identity, resume, done = preflight(cfg)
    if resume is None:
        _warn_foreign_checkpoints(cfg.output_dir, identity)
    elif done is not None:
        from seqcpo.training.finished import finish_without_training

        out = finish_without_training(cfg, resume, done, identity)
        _end_process_group()
        return identity, resume, out
    return identity, resume, None


def _datasets(cfg: SeqCPOConfig, tokenizer, model):
    """``(splits, training dataset or stream, evaluation dataset or None, fixed negatives by id or None, their
    manifest or None)``. Windows carry their fixed negatives in their items; document rows do not (their anchors'
    windows are looked up in the step), so the rows by id go to the trainer."""
    from seqcpo.batching import ExampleDataset
    from seqcpo.training.quality import wants_quality

    context = model_context_tokens(getattr(model, "config", None))
    if cfg.streaming:
        from seqcpo.data.streaming import load_streaming

        quality = wants_quality(cfg)  # the quality slice's split is held too
        splits = load_streaming(cfg.data_config(), tokenizer, context_tokens=context,
                                need_validation=cfg.eval_strategy != "no" or (quality and cfg.quality_split == "validation"),
                                need_test=quality and cfg.quality_split == "test")
    else:
        splits = load_splits(cfg.data_config(), tokenizer, context_tokens=context)
    if cfg.uses_negatives and not cfg.streaming and "data" in dict(cfg.negatives_parts):
        from seqcpo.negatives.data import check_data_examples

        check_data_examples(splits.train)  # before training: the data's task is known once it is read
    offline, offline_meta = None, None
    if cfg.negatives_path and cfg.uses_negatives:
        from seqcpo.training.offline_reader import read_offline_negatives

        # a stream is not held: its examples are looked up as they are read (the check below is the in-memory one)
        offline, offline_meta = read_offline_negatives(cfg.negatives_path, cfg,
                                                       None if cfg.streaming else splits.train)
    eval_ds = None
    if cfg.eval_strategy != "no" and splits.validation:
        eval_ds = ExampleDataset(splits.validation, None)
    in_items = None if cfg.task == "document" else offline
    if cfg.streaming:
        cfg.ignore_data_skip = True  # the stream restarts at its stored position: the Trainer must not replay
        train_ds = splits.train(tokenizer, cfg.process_index, cfg.world_size, in_items)
    else:
        train_ds = ExampleDataset(splits.train, in_items)
    return splits, train_ds, eval_ds, offline, offline_meta


def _trainer(cfg, model, tokenizer, train_ds, eval_ds, offline, callbacks, identity):
    from seqcpo.training.separation import SeparationMonitor
    from seqcpo.training.trainer import SeqCPOTrainer

    rows, meta = offline
    trainer = SeqCPOTrainer(model, cfg, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                            offline_meta=meta, offline_windows=rows if cfg.task == "document" else None,
                            callbacks=callbacks)
    trainer.run_identity = identity
    if cfg.streaming:
        from seqcpo.data.stream_resume import StreamPositionCallback

        trainer.add_callback(StreamPositionCallback(train_ds))
    trainer.add_callback(SeparationMonitor())  # says in the log when every negative is ranked below the gold
    if cfg.uses_negatives:  # says in the log when the gold's own log-prob falls while the margins grow
        from seqcpo.training.gold_watch import GoldLikelihoodMonitor

        trainer.add_callback(GoldLikelihoodMonitor(cfg.gold_logp_window, cfg.gold_logp_max_drop))
    return trainer


def _example_counts(cfg, splits) -> dict[str, Any]:
    return {
        "train": None if cfg.streaming else len(splits.train),  # a stream has no length
        "validation": len(splits.validation),
        "test": len(splits.test),
    }


def _end_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # end the process group cleanly: a rank leaving with live gloo threads aborts at interpreter exit
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _warn_foreign_checkpoints(output_dir: str, identity: dict) -> None:
    """A fresh run into a folder holding another run's checkpoints: say so (they are left alone, not rotated)."""
    from seqcpo.training.checkpoints import identity_key, list_checkpoints, read_marker

    key = identity_key(identity)
    foreign = [p for _, p in list_checkpoints(output_dir)
               if (m := read_marker(p)) is None or m.get("identity_key") != key]
    if foreign:
        logger.warning(
            "output_dir %s already holds %d checkpoint(s) of another run or torn ones (%s): this run starts afresh "
            "and leaves them alone; a folder at a step this run saves is replaced",
            output_dir, len(foreign), ", ".join(os.path.basename(p) for p in foreign[:5]),
        )


def _set_aside_other_final(output_dir: str, identity: dict) -> None:
    """Another run's complete ``final/`` in ``output_dir`` (the only copy of its model under ``save_strategy: no``)
    is moved aside with that run's top-level files, never replaced: ``other-run-<key>-final/``, as a checkpoint of
    another run at a step this run saves is (:mod:`seqcpo.training.checkpoints.saving`)."""
    from seqcpo.training.checkpoints import identity_key, read_marker, set_aside

    final_dir = os.path.join(output_dir, "final")
    other = read_marker(final_dir) if os.path.isdir(final_dir) else None
    if other is None or other.get("identity_key") == identity_key(identity):
        return
    aside = set_aside(output_dir, final_dir, other)
    for name in ("seqcpo_config.yaml", "run_info.json", "log_history.json"):  # that run's, about to be replaced
        if os.path.isfile(os.path.join(output_dir, name)):
            shutil.copy2(os.path.join(output_dir, name), os.path.join(aside, "run-" + name))
    logger.warning("output_dir %s held the final model of another run (other settings): moved to %s with that "
                   "run's files; this run writes its own final/", output_dir, aside)


def _write_final(trainer, final_dir: str, tokenizer, identity: dict) -> None:
    """``final/`` from the trained model, replacing an older one whole, marked complete; a failed write (a full
    disk) is one line that says how to write it from the last checkpoint."""
    from seqcpo.training.checkpoints import CheckpointWriteError, newest_complete
    from seqcpo.training.checkpoints.saving import write_errors

    try:
        if trainer.is_world_process_zero() and os.path.isdir(final_dir):
            shutil.rmtree(final_dir)  # an older final/ is replaced whole: its marker must not vouch for new files
        trainer.accelerator.wait_for_everyone()
        if trainer.cfg.lora:
            _save_merged(trainer, final_dir, tokenizer)
        else:
            trainer.save_model(final_dir)
        trainer.accelerator.wait_for_everyone()
        if trainer.is_world_process_zero():
            write_complete_marker(final_dir, trainer.state.global_step, identity,
                                  {"seconds": trainer.seqcpo_seconds(), **trainer.seqcpo_untimed})
    except write_errors() as e:
        last, _ = newest_complete(trainer.args.output_dir)
        why = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointWriteError(
            f"output_dir={trainer.args.output_dir!r}: writing final/ failed ({why}); "
            + (f"free space and run the same command with --resume_from_checkpoint true: it writes final/ from {last}"
               if last else "no checkpoint was kept (save_strategy)")
        ) from e


def _save_merged(trainer, final_dir: str, tokenizer) -> None:
    """LoRA: write the adapter merged into the base weights, so plain transformers loads the result."""
    from seqcpo.training.config import save_config
    from seqcpo.training.model_card import write_model_card

    model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.is_world_process_zero():
        merged = model.merge_and_unload(safe_merge=True) if hasattr(model, "merge_and_unload") else model
        merged.save_pretrained(final_dir, safe_serialization=True)
        tokenizer.save_pretrained(final_dir)
        write_model_card(final_dir, trainer.cfg)
        save_config(trainer.cfg, os.path.join(final_dir, "seqcpo_config.yaml"))


def make_negatives(cfg: SeqCPOConfig, out_dir: str, shard_size: int = 256) -> dict[str, Any]:
    """Fixed negatives + reference log-probs for the training split, into ``out_dir`` (resumable)."""
    from seqcpo.training.offline import make_offline_negatives

    prepare_output_dir(out_dir, option="--out")
    set_seed(cfg.seed)
    _, tokenizer, model = _load(cfg)
    model.requires_grad_(False)
    if cfg.reference_dtype:  # the reference makes the negatives and scores them: at its dtype, as in training
        model = model.to(getattr(torch, cfg.reference_dtype))
    splits = load_splits(cfg.data_config(), tokenizer, context_tokens=model_context_tokens(model.config))
    with torch.no_grad():
        manifest = make_offline_negatives(cfg, splits.train, model, tokenizer, out_dir, shard_size=shard_size)
    return {"out_dir": out_dir, "examples": len(splits.train), "shards": manifest["num_shards"]}


def next_train_command(config: str | None, overrides: list[str], out_dir: str) -> str:
    """The ``seqcpo train`` command that trains on the negatives ``seqcpo negatives`` just made: the same config
    and every ``--key value`` override it was run with (so the folder's settings match), plus ``--negatives_path``."""
    import shlex

    kept, skip = [], False
    for arg in overrides:
        if skip:
            skip = False
            continue
        key = arg.lstrip("-").split("=", 1)[0].replace("-", "_")
        if arg.startswith("-") and key == "negatives_path":
            skip = "=" not in arg
            continue
        # flags in the config's field names (docs/CONFIG.md), however they were typed
        kept.append("--" + key + arg[arg.index("="):] if arg.startswith("--") and "=" in arg
                    else "--" + key if arg.startswith("--") else arg)
    parts = ["seqcpo", "train", *(["--config", config] if config else []), *kept, "--negatives_path", out_dir]
    return shlex.join(parts)
