"""What ``seqcpo train`` and ``seqcpo negatives`` do, as functions (the CLI only parses arguments)."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch
from transformers import set_seed

from seqcpo.data import load_splits
from seqcpo.models import apply_lora, load_model, load_tokenizer, resolve_model_path
from seqcpo.training.config import SeqCPOConfig, save_config

logger = logging.getLogger("seqcpo")


def _load(cfg: SeqCPOConfig):
    path = resolve_model_path(cfg.model_name_or_path)
    tokenizer = load_tokenizer(path, trust_remote_code=cfg.trust_remote_code)
    model = load_model(
        path,
        dtype=cfg.model_dtype,
        trust_remote_code=cfg.trust_remote_code,
        attn_implementation=cfg.attn_implementation,
        gradient_checkpointing=cfg.gradient_checkpointing,
    )
    return path, tokenizer, model


def _resume_arg(value):
    if value is None or value is False:
        return None
    if isinstance(value, str) and value.lower() in ("true", "latest", "auto", "yes"):
        return True
    return value


def train(cfg: SeqCPOConfig) -> dict[str, Any]:
    """Train per ``cfg``; returns where everything went (output folder, final checkpoint, config, logs)."""
    from seqcpo.training.separation import SeparationMonitor
    from seqcpo.training.trainer import ExampleDataset, SeqCPOTrainer

    t0 = time.time()
    set_seed(cfg.seed)
    path, tokenizer, model = _load(cfg)
    splits = load_splits(cfg.data_config(), tokenizer)
    offline, offline_meta = None, None
    if cfg.negatives_path and cfg.uses_negatives:
        from seqcpo.training.offline import read_offline_negatives

        offline, offline_meta = read_offline_negatives(cfg.negatives_path, cfg, splits.train)
    if cfg.lora:
        model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           target_modules=cfg.lora_target_modules)
    eval_ds = None
    if cfg.eval_strategy != "no" and splits.validation:
        eval_ds = ExampleDataset(splits.validation, None)
    trainer = SeqCPOTrainer(
        model,
        cfg,
        train_dataset=ExampleDataset(splits.train, offline),
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        offline_meta=offline_meta,
    )
    trainer.add_callback(SeparationMonitor())  # says in the log when every negative is ranked below the gold
    os.makedirs(cfg.output_dir, exist_ok=True)
    config_path = os.path.join(cfg.output_dir, "seqcpo_config.yaml")
    if trainer.is_world_process_zero():
        save_config(cfg, config_path)
    result = trainer.train(resume_from_checkpoint=_resume_arg(cfg.resume_from_checkpoint))
    final_dir = os.path.join(cfg.output_dir, "final")
    if cfg.lora:
        _save_merged(trainer, final_dir, tokenizer)
    else:
        trainer.save_model(final_dir)
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
                "seconds": round(time.time() - t0, 1),
                "model_path": path,
            },
        )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # end the process group cleanly: a rank leaving with live gloo threads aborts at interpreter exit
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return {
        "output_dir": cfg.output_dir,
        "final_checkpoint": final_dir,
        "config": config_path,
        "log_history": os.path.join(cfg.output_dir, "log_history.json"),
        "train_loss": result.training_loss,
        "steps": trainer.state.global_step,
        "seconds": round(time.time() - t0, 1),
        "examples": {"train": len(splits.train), "validation": len(splits.validation), "test": len(splits.test)},
        "model_path": path,
        "trainer": trainer,
    }


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

    set_seed(cfg.seed)
    _, tokenizer, model = _load(cfg)
    model.requires_grad_(False)
    splits = load_splits(cfg.data_config(), tokenizer)
    with torch.no_grad():
        manifest = make_offline_negatives(cfg, splits.train, model, tokenizer, out_dir, shard_size=shard_size)
    return {"out_dir": out_dir, "examples": len(splits.train), "shards": manifest["num_shards"]}
