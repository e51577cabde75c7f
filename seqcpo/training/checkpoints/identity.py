"""Run identity: what a checkpoint records about the run that wrote it, and which changes a resume refuses.

Every ``checkpoint-N`` carries the run's resolved config and content digests of its data and starting model
(:func:`run_identity`). Resuming compares them with the current run and refuses a change in anything that decides
the result (learning rate, objective, negatives, beta, data, model, seed, batch sizes, ...), naming each field and
its two values, unless ``allow_config_change`` is set. Settings that only decide where and how often things are
written or shown (``output_dir``, logging, save frequency, workers, ``report_to``, the resume options themselves;
:data:`NOT_DECISIVE`) may change.

Content, not paths: a data file's or a model folder's digest is the sha256 of every byte
(:func:`seqcpo.models.file_digest`, hashed once and cached by path, size, modification and status-change time),
so a same-size edit anywhere in a file, or weights replaced under the same folder name, is another run.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from seqcpo.models import file_digest, model_digest, source_digest

# Settings that do not change what a run computes: where and how often it writes, logs, evaluates or shows
# progress, how data is fed (workers), and the resume options themselves. Everything else decides the run, so a
# field added later is compared by default. ``logps_layout`` and ``logits_chunk_size`` give the same numbers
# (tested in test_fast_paths.py); checkpointing trades memory for time only.
NOT_DECISIVE = frozenset(
    {
        "output_dir", "overwrite_output_dir", "run_name", "project", "report_to", "disable_tqdm",
        "logging_dir", "logging_strategy", "logging_steps", "logging_first_step", "logging_nan_inf_filter",
        "log_on_each_node", "log_level", "log_level_replica", "include_num_input_tokens_seen",
        "include_tokens_per_second", "skip_memory_metrics",
        "save_strategy", "save_steps", "save_total_limit", "save_on_each_node", "save_only_model",
        "save_safetensors", "enable_jit_checkpoint",
        "eval_strategy", "eval_steps", "eval_delay", "eval_on_start", "per_device_eval_batch_size",
        "eval_accumulation_steps", "eval_do_concat_batches", "eval_use_gather_object", "prediction_loss_only",
        "include_for_metrics", "batch_eval_metrics", "bf16_full_eval", "fp16_full_eval",
        "load_best_model_at_end", "metric_for_best_model", "greater_is_better",
        "push_to_hub", "hub_model_id", "hub_strategy", "hub_private_repo", "hub_always_push", "hub_revision",
        "resume_from_checkpoint", "allow_config_change", "ignore_data_skip", "restore_callback_states_from_checkpoint",
        "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
        "dataloader_prefetch_factor", "dataloader_multiprocessing_context",
        "ddp_timeout", "ddp_backend", "ddp_bucket_cap_mb", "torch_empty_cache_steps",
        "do_train", "do_eval", "do_predict", "local_rank", "use_cpu", "no_cuda",
        "logps_layout", "logits_chunk_size", "gradient_checkpointing", "gradient_checkpointing_kwargs",
        "activation_checkpointing", "activation_checkpointing_kwargs", "an_vllm_gpu_memory_utilization",
    }
)
# How long the run is: decisive only when the learning-rate schedule depends on it (a constant schedule may be
# extended by resuming with more steps).
_LENGTH_FIELDS = ("max_steps", "num_train_epochs")
_LENGTH_FREE_SCHEDULES = ("constant", "constant_with_warmup")
# How a step is split: free to change unless batch negatives are drawn live (see _split_matters).
_SPLIT_FIELDS = ("per_device_train_batch_size", "gradient_accumulation_steps")


def data_fingerprint(cfg) -> str:
    """A hash of everything that decides the training records: the data settings, and the content of the local
    dataset file or folder (sha256 of every file, cached) or the embedded corpus; a Hub id by name, split and
    subset. With fixed negatives, their folder's manifest (which lists every shard's sha256) is included too.
    """
    from dataclasses import fields

    from seqcpo.data.config import DataConfig

    parts: dict[str, Any] = {f.name: getattr(cfg, f.name) for f in fields(DataConfig)}
    name = str(cfg.dataset)
    path = os.path.expanduser(name)
    if name == "wiki":
        from seqcpo.data.sources import wiki_path

        parts["content"] = file_digest(wiki_path())
    elif os.path.exists(path):
        parts["content"] = source_digest(path)
    negatives_path = getattr(cfg, "negatives_path", None)
    if negatives_path and getattr(cfg, "uses_negatives", False):
        manifest = os.path.join(negatives_path, "manifest.json")
        parts["negatives"] = file_digest(manifest) if os.path.isfile(manifest) else None
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def run_identity(cfg, world_size: int = 1) -> dict[str, Any]:
    """What a checkpoint records about the run that wrote it: the resolved config (no secrets), the data
    fingerprint and the number of processes (with the per-device batch it fixes the global batch)."""
    return {
        "config": json.loads(json.dumps(cfg.to_public_dict(), default=str)),
        "data_fingerprint": data_fingerprint(cfg),
        "model_fingerprint": model_fingerprint(cfg.model_name_or_path),
        "world_size": int(world_size),
    }



def model_fingerprint(name_or_path: str) -> str | None:
    """The starting model's content digest (:func:`seqcpo.models.model_digest`: weights, config and tokenizer
    files of a local folder or the converted embedded model): a folder rewritten under the same path (say, a
    re-run MLE model) is another start. None for a Hub id."""
    return model_digest(name_or_path)


def _split_matters(config: dict[str, Any]) -> bool:
    """Whether how a step is split (per-device batch, accumulation, processes) decides it, not only the global
    batch: steps are split-invariant except for batch negatives (BN) drawn live, which come from each
    micro-batch (tests/test_split_invariance.py)."""
    from seqcpo.training.config import PREFERENCE_OBJECTIVES

    if config.get("objective") not in PREFERENCE_OBJECTIVES or config.get("negatives_path"):
        return False
    return "bn" in {part.split(":")[0].strip().lower() for part in str(config.get("negatives", "")).split(",")}


_GLOBAL_BATCH = "global batch (per_device_train_batch_size x gradient_accumulation_steps x processes)"


def _decisive_view(identity: dict[str, Any], length_free: bool, split_free: bool) -> dict[str, Any]:
    """The settings of ``identity`` that decide the run, by name (with the global batch or the number of
    processes as pseudo-fields)."""
    config = identity.get("config", {})
    skip = set(NOT_DECISIVE) | (set(_LENGTH_FIELDS) if length_free else set()) | (
        set(_SPLIT_FIELDS) if split_free else set())
    view = {k: v for k, v in config.items() if k not in skip}
    world = identity.get("world_size", 1)
    if split_free:
        try:
            view[_GLOBAL_BATCH] = (int(config["per_device_train_batch_size"])
                                   * int(config["gradient_accumulation_steps"]) * int(world))
        except (KeyError, TypeError, ValueError):
            view[_GLOBAL_BATCH] = None
    else:
        view["world_size (training processes)"] = world
    return view


def _length_free(config: dict[str, Any]) -> bool:
    return str(config.get("lr_scheduler_type")) in _LENGTH_FREE_SCHEDULES


def identity_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """The decisive settings that differ between two identities: ``[(field, saved value, current value)]``."""
    old_cfg, new_cfg = saved.get("config", {}), current.get("config", {})
    length_free = _length_free(old_cfg) and _length_free(new_cfg)
    split_free = not _split_matters(old_cfg) and not _split_matters(new_cfg)
    old = _decisive_view(saved, length_free, split_free)
    new = _decisive_view(current, length_free, split_free)
    # a field only one side knows (a seqcpo version that added or dropped an option) is not compared
    diffs = [(name, old[name], new[name]) for name in sorted(set(old) & set(new)) if old[name] != new[name]]
    changed = {d[0] for d in diffs}

    def content(kind: str, label: str, named_by: set[str]) -> None:
        # a content change under unchanged names; a renamed source is already reported by its field
        a, b = saved.get(kind), current.get(kind)
        if a != b and not changed & named_by:
            diffs.append((label, f"fingerprint {str(a)[:12]}", f"fingerprint {str(b)[:12]}"))

    content("data_fingerprint", "data (content of the dataset / negatives)", _data_field_names() | {"negatives_path"})
    content("model_fingerprint", "model (content of model_name_or_path)", {"model_name_or_path"})
    return diffs


def _data_field_names() -> set[str]:
    from dataclasses import fields

    from seqcpo.data.config import DataConfig

    return {f.name for f in fields(DataConfig)}


def identity_key(identity: dict[str, Any]) -> str:
    """A short hash of the decisive part of an identity: two checkpoints of one run share it."""
    config = identity.get("config", {})
    view = _decisive_view(identity, _length_free(config), not _split_matters(config))
    blob = json.dumps([view, identity.get("data_fingerprint"), identity.get("model_fingerprint")], sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]

