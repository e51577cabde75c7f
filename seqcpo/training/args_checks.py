"""Checks of the inherited ``transformers.TrainingArguments`` fields that transformers makes late or not at all:
their ranges, the trackers ``report_to`` names (integration known, package installed), and fields an older
transformers had (the loader says where they went). :class:`seqcpo.training.config.SeqCPOConfig` applies them
when a config is read, before any model or data loads."""

from __future__ import annotations

# report_to value -> (the package it needs, the pyproject extra that installs it)
TRACKERS = {"wandb": ("wandb", "wandb"), "tensorboard": ("tensorboard", "tracking")}


def missing_trackers(report_to) -> list[str]:
    """The trackers in ``report_to`` (a name or a list) whose package is not importable."""
    import importlib.util

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    return [n for n in names if n in TRACKERS and importlib.util.find_spec(TRACKERS[n][0]) is None]


# Ranges of TrainingArguments fields (transformers checks few of them; a NaN learning rate trains NaN weights).
# Seeds: numpy's range, which set_seed needs (transformers fails on it only after the data has loaded).
TRAINING_ARGS_CHECKS = {
    "seed": "[0,4294967295]",
    "data_seed": "[0,4294967295]",
    "learning_rate": ">=0",
    "weight_decay": ">=0",
    "adam_beta1": "[0,1)",
    "adam_beta2": "[0,1)",
    "adam_epsilon": ">=0",
    "max_grad_norm": ">=0",
    "warmup_steps": ">=0",
    "per_device_train_batch_size": ">=1",
    "per_device_eval_batch_size": ">=1",
    "gradient_accumulation_steps": ">=1",
    "num_train_epochs": ">=0",
    "logging_steps": ">=0",
    "save_steps": ">=0",
    "dataloader_num_workers": ">=0",
}


# Fields of older transformers that the installed one folded into another: the loader says where they went.
MOVED_FIELDS_BY_NAME = {
    "warmup_ratio": "transformers 5 folded it into warmup_steps: a warmup_steps below 1 is a fraction of the steps",
}


def integration_error(report_to) -> str | None:
    """Why ``report_to`` (a name or a list) names no transformers integration ("none" and "all" are words of
    report_to), or None: transformers itself says so only when the Trainer is built, after the data has loaded."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    unknown = [n for n in names if n not in INTEGRATION_TO_CALLBACK and n not in ("none", "all")]
    if not unknown:
        return None
    return (f"report_to={unknown[0]!r}: not a transformers integration; choose none, all or "
            f"{', '.join(INTEGRATION_TO_CALLBACK)}")
