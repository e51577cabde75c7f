"""``docs/CONFIG.md``: the reference of every seqcpo config field, generated from the dataclasses
(``python -m seqcpo.training.config_reference > docs/CONFIG.md``; a test keeps the file in step)."""

from __future__ import annotations

import dataclasses

from transformers import TrainingArguments

from seqcpo.negatives.registry import OPTIONS as NEGATIVE_OPTIONS
from seqcpo.training.args_checks import TRAINING_ARGS_CHECKS
from seqcpo.training.config import SeqCPOConfig


def config_reference() -> str:
    """Markdown table of every seqcpo field (data, model, objective, negatives, reference, PSS, speed).

    ``docs/CONFIG.md`` is this text; a test keeps the two in step. The ``TrainingArguments`` fields
    (learning rate, batch size, schedule, logging, checkpoints, ``report_to``) are documented by transformers.
    """
    from seqcpo.config_loader import field_rules

    train_names = {f.name for f in dataclasses.fields(TrainingArguments)}
    rules = field_rules(SeqCPOConfig)
    lines = [
        "# Config reference",
        "",
        "Generated from `seqcpo.training.config.SeqCPOConfig` (`python -m seqcpo.training.config_reference > docs/CONFIG.md`).",
        "Every field can be set in the YAML file or as `--field value` on the command line. All fields of",
        "`transformers.TrainingArguments` (learning_rate, per_device_train_batch_size, max_steps, bf16,",
        "gradient_checkpointing, save_steps, report_to, ...) are accepted too.",
        "",
        "Ranges are checked where a value enters (YAML or command line); floats must be finite everywhere.",
        "The negatives' options are declared once in `seqcpo.negatives.registry.OPTIONS`.",
        "",
        "| field | default | range | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for f in dataclasses.fields(SeqCPOConfig):
        if f.name in train_names or not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", "").replace("|", "\\|")
        key = f.metadata.get("negative_option")
        choices = NEGATIVE_OPTIONS[key].choices if key else None
        rule = rules.get(f.name) or ("one of " + ", ".join(choices) if choices else "")
        rule = f"`{rule}`" if rule else ""
        lines.append(f"| `{f.name}` | `{default!r}` | {rule} | {help_text} |")
    lines += ["", "Ranges checked on `TrainingArguments` fields: "
              + ", ".join(f"`{k}` `{v}`" for k, v in TRAINING_ARGS_CHECKS.items()) + ".", ""]
    lines += _eval_reference()
    return "\n".join(lines) + "\n"


def _eval_reference() -> list[str]:
    """The `seqcpo eval` / `generate` / grid `eval:` fields (:class:`seqcpo.evaluation.config.EvalConfig`)."""
    try:
        from seqcpo.evaluation.config import config_reference_lines
    except ImportError:
        return []
    return config_reference_lines()


if __name__ == "__main__":
    print(config_reference(), end="")
