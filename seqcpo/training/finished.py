"""A finished run stays finished: ``--resume_from_checkpoint true`` on a run that reached its length trains nothing.

Resuming a run whose newest complete checkpoint is at (or past) ``max_steps`` says so in one log line, writes no
``checkpoint-(max+1)``, and leaves ``final/`` as written. ``final/`` is written once: when it is missing or torn
(the run died after its last checkpoint), it is written from that checkpoint's weights (copied; a LoRA adapter
merged into the base weights, as training writes it), never from one more step of training.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Any

from seqcpo.training.checkpoints import COMPLETE_MARKER, identity_key, read_marker, write_complete_marker

logger = logging.getLogger("seqcpo")

# files of a checkpoint that a resume needs and a final model does not
RESUME_ONLY = ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", COMPLETE_MARKER)
# what a marker and run_info.json record of a run's time (seqcpo.training.run)
TIMING_KEYS = ("seconds", "seconds_untimed_before_step")


def finish_without_training(cfg, checkpoint: str, step: int, identity: dict[str, Any]) -> dict[str, Any]:
    """The result of ``train`` for a run already at its length: ``final/`` kept, or written from ``checkpoint``."""
    final_dir = os.path.join(cfg.output_dir, "final")
    marker = read_marker(final_dir)
    kept = marker is not None and marker.get("step") == step and marker.get("identity_key") == identity_key(identity)
    length = f"max_steps={cfg.max_steps}" if cfg.max_steps and cfg.max_steps > 0 else f"{cfg.num_train_epochs} epochs"
    if kept:
        logger.info("resume: this run already reached step %d (%s) in %s: nothing to train; final/ is kept as "
                    "written", step, length, checkpoint)
    else:
        logger.info("resume: this run already reached step %d (%s) in %s: nothing to train; writing final/ from "
                    "that checkpoint (it was missing or incomplete)", step, length, checkpoint)
        if cfg.process_index == 0:
            write_final_from_checkpoint(cfg, checkpoint, final_dir, step, identity)
    info = _run_info(cfg.output_dir)
    timing = read_marker(checkpoint) or {}  # the checkpoint's own record first: run_info may be missing or older
    if not isinstance(timing.get("seconds"), (int, float)):
        timing = info
    return {
        "output_dir": cfg.output_dir,
        "final_checkpoint": final_dir,
        "config": os.path.join(cfg.output_dir, "seqcpo_config.yaml"),
        "log_history": os.path.join(cfg.output_dir, "log_history.json"),
        "train_loss": info.get("train_loss"),
        "steps": step,
        "seconds": timing.get("seconds"),  # the run's, as recorded when it finished (nothing was trained now)
        **{k: timing[k] for k in TIMING_KEYS[1:] if timing.get(k) is not None},
        "examples": info.get("examples") or {"train": None, "validation": None, "test": None},
        "model_path": info.get("model_path"),
        "trainer": None,
        "already_finished": True,
    }


def _run_info(output_dir: str) -> dict[str, Any]:
    try:
        with open(os.path.join(output_dir, "run_info.json"), encoding="utf-8") as fh:
            info = json.load(fh)
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def write_final_from_checkpoint(cfg, checkpoint: str, final_dir: str, step: int, identity: dict[str, Any]) -> None:
    """``final/`` from ``checkpoint``: its weights, config, tokenizer and model card, written to a temp folder and
    renamed into place, then marked complete."""
    from seqcpo.training.config import ConfigError

    parent = os.path.dirname(os.path.abspath(final_dir))
    tmp = tempfile.mkdtemp(dir=parent, prefix=".final.tmp-")
    try:
        if os.path.isfile(os.path.join(checkpoint, "adapter_config.json")):
            _merge_adapter(cfg, checkpoint, tmp)
        elif any(f.endswith((".safetensors", ".safetensors.index.json")) for f in os.listdir(checkpoint)):
            for name in os.listdir(checkpoint):
                src = os.path.join(checkpoint, name)
                if os.path.isfile(src) and name not in RESUME_ONLY and not name.startswith("rng_state"):
                    shutil.copyfile(src, os.path.join(tmp, name))
        else:
            raise ConfigError(f"{checkpoint}: no safetensors weights to write final/ from (sharded FSDP state?); "
                              "load it with the Trainer and save the model yourself")
        if os.path.isdir(final_dir):
            shutil.rmtree(final_dir)  # an older, incomplete final/ is replaced whole
        os.rename(tmp, final_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    marker = read_marker(checkpoint) or {}
    write_complete_marker(final_dir, step, identity, {k: marker.get(k) for k in TIMING_KEYS})


def _merge_adapter(cfg, checkpoint: str, out: str) -> None:
    """A LoRA checkpoint's adapter merged into the base model, saved with the tokenizer, card and config."""
    from peft import PeftModel

    from seqcpo.models import load_model, load_tokenizer, resolve_model_path
    from seqcpo.training.config import save_config
    from seqcpo.training.model_card import write_model_card

    base_path = resolve_model_path(cfg.model_name_or_path)
    base = load_model(base_path, dtype=cfg.model_dtype, trust_remote_code=cfg.trust_remote_code)
    merged = PeftModel.from_pretrained(base, checkpoint).merge_and_unload(safe_merge=True)
    merged.save_pretrained(out, safe_serialization=True)
    load_tokenizer(checkpoint if os.path.isfile(os.path.join(checkpoint, "tokenizer_config.json")) else base_path,
                   trust_remote_code=cfg.trust_remote_code).save_pretrained(out)
    write_model_card(out, cfg)
    save_config(cfg, os.path.join(out, "seqcpo_config.yaml"))
