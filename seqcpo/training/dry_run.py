"""``seqcpo train --dry-run``: resolve everything a run needs and print its plan, without training.

Resolved: the config (the one loader, every check); the model's shape from its config alone (the parameters
are counted on the ``meta`` device: no weights are loaded or allocated); the tokenizer, the data and its splits;
the first batch with its negatives (the model-free generators, TN and BN, are run; AN / MN negatives, which need
the weights, are stood in for by their longest possible length: ``an_max_new_tokens`` for AN, the gold's for MN)
and the log-prob layout ``auto`` would choose for it. Printed: the plan (steps, examples, epochs, negatives,
layout) and a rough memory estimate per process (weights + gradients + AdamW + reference + activations).

Document rows (``task: document``) are planned as rows: rows per step, the first micro-batch's row lengths, its
anchors per row (:func:`seqcpo.document_rows.anchor_count`; drawn as the trainer's first step draws them) and the
tokens of its one forward pass, the rows plus every anchor's K negatives as branches
(:func:`seqcpo.document_rows.document_tokens`, each negative counted at its longest: C tokens, AN's
``an_max_new_tokens``), which the activation estimate is made from.

A GPU config (``bf16: true``, ...) is checked on a machine without a GPU: the config is loaded as for the GPU
and the device checks transformers makes at load time are said to be skipped.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GB = 1024**3


@dataclass
class Plan:
    """What ``--dry-run`` found; :func:`render` prints it."""

    lines: list[tuple[str, str]] = field(default_factory=list)
    memory: dict[str, float] = field(default_factory=dict)  # part -> bytes per process

    def add(self, key: str, text: str) -> None:
        self.lines.append((key, text))


def load_for_dry_run(config_path, overrides: dict[str, Any]):
    """The config; on a machine without the GPU a ``bf16`` / ``fp16`` config asks for, loaded as on the GPU
    (``use_cpu`` set only to pass transformers' device check). Returns ``(cfg, note or None)``."""
    from seqcpo.training.config import ConfigError, load_config

    try:
        return load_config(config_path, overrides), None
    except ConfigError as e:
        if "bf16" not in str(e) and "fp16" not in str(e) and "gpu" not in str(e).lower():
            raise
        cfg = load_config(config_path, {**overrides, "use_cpu": True})
        return cfg, f"this machine has no GPU for it: transformers' device check skipped ({e})"


def dry_run(config_path, overrides: dict[str, Any]) -> str:
    """The text ``seqcpo train --dry-run`` prints."""
    cfg, note = load_for_dry_run(config_path, overrides)
    return render(make_plan(cfg, note, "--output_dir" if "output_dir" in overrides else "output_dir"))


def _preflight(cfg, output_option: str, plan: Plan) -> bool:
    """The checks a run makes before loading anything (:func:`seqcpo.training.run.preflight`: streaming's needs,
    the resume, the fixed negatives' settings) and the output folder proved writable when it or its parent exists
    here (nothing is left in it); True when the run has already reached its length (nothing to plan)."""
    from seqcpo.training.checkpoints import newest_complete, probe_output_dir, read_marker
    from seqcpo.training.run import preflight

    out = os.path.abspath(os.path.expanduser(cfg.output_dir))
    here = os.path.exists(out) or os.path.isdir(os.path.dirname(out))
    if here:
        probe_output_dir(cfg.output_dir, output_option)
    else:  # a config written here may run on another machine (as the config's own check: config_loader)
        plan.add("output", f"{cfg.output_dir}: its parent folder is not on this machine; not probed, no resume "
                           "judged")
    # this one process judges a checkpoint for the number of processes that wrote it (a multi-GPU launch)
    newest = newest_complete(out)[0] if here and os.path.isdir(out) else None
    world = ((read_marker(newest) or {}).get("identity") or {}).get("world_size") if newest else None
    _, resume, done = preflight(cfg, world_size=world if isinstance(world, int) and world > 0 else None,
                                resume_here=here)
    if done is not None:
        plan.add("resume", f"{resume} is step {done}: the run has reached its length and would train nothing")
        return True
    if resume is not None:
        plan.add("resume", f"from {resume} (complete, written under these settings"
                           + (f", by {world} processes" if world and world != cfg.world_size else "") + ")")
    return False


def make_plan(cfg, note: str | None = None, output_option: str = "output_dir") -> Plan:
    from seqcpo.data import model_context_tokens
    from seqcpo.models import load_tokenizer, resolve_model_path

    plan = Plan()
    if note:
        plan.add("device", note)
    neg = f", negatives {cfg.negatives} (K = {cfg.num_negatives})" if cfg.uses_negatives else ""
    ref = f", reference {cfg.reference}" if cfg.uses_negatives else ""
    document = cfg.task == "document"
    layout = "one pass per micro-batch (rows + branches)" if document and cfg.uses_negatives else cfg.logps_layout
    plan.add("config", f"objective {cfg.objective}{neg}{ref}, layout {layout}, output {cfg.output_dir}")
    if _preflight(cfg, output_option, plan):
        return plan
    from seqcpo.models.loading import ModelNotFoundError

    try:
        path = resolve_model_path(cfg.model_name_or_path)
        model, shape = meta_model(path, cfg)
        tokenizer = load_tokenizer(path, trust_remote_code=cfg.trust_remote_code)
    except ModelNotFoundError as e:  # the setting that named it, as the run says it
        raise ModelNotFoundError(f"model_name_or_path: {e}") from None
    plan.add("model", shape)
    train, first = _data(cfg, tokenizer, model_context_tokens(model.config), plan)
    offline = None
    if cfg.negatives_path and cfg.uses_negatives:  # the run's own checks of the folder, every row of the split
        from seqcpo.training.offline_reader import read_offline_negatives

        offline, _ = read_offline_negatives(cfg.negatives_path, cfg, train)
    _steps(cfg, len(train) if train is not None else None, plan)
    if document:
        tokens = _first_rows(cfg, first, plan)
    else:
        _, tokens = _first_batch(cfg, model, first, tokenizer, plan, offline)
    _memory(cfg, model, tokens, plan)
    return plan


def meta_model(path: str, cfg):
    """The model built from its config on the ``meta`` device (shapes, no storage), and a line describing it."""
    from transformers import AutoModelForCausalLM

    from seqcpo.models.loading import load_model_config

    config = load_model_config(path, trust_remote_code=cfg.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    if cfg.lora:
        from seqcpo.models import apply_lora

        model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           target_modules=cfg.lora_target_modules)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    get = lambda *names: next((getattr(config, n) for n in names if getattr(config, n, None)), "?")  # noqa: E731
    text = (f"{path}: {config.model_type}, {get('num_hidden_layers', 'n_layer')} layers, hidden "
            f"{get('hidden_size', 'n_embd')}, vocab {get('vocab_size')}, context "
            f"{get('max_position_embeddings', 'n_positions')}; {total:,} parameters"
            + (f", {trainable:,} trainable (LoRA r={cfg.lora_r})" if cfg.lora else "")
            + f"; weights {cfg.model_dtype} (not loaded)")
    return model, text


def _data(cfg, tokenizer, context, plan: Plan):
    """The training examples (None for a stream) and the first micro-batch's examples."""
    bs = cfg.per_device_train_batch_size
    if cfg.streaming:
        from seqcpo.data.streaming import load_streaming

        splits = load_streaming(cfg.data_config(), tokenizer, context_tokens=context, need_validation=False)
        first = []
        for item in splits.train(tokenizer, 0, 1, None):
            first.append(item)
            if len(first) == bs:
                break
        from seqcpo.batching import collate_examples

        plan.add("data", f"{cfg.dataset} ({splits.stats.get('task', cfg.task)}), streamed: {_unit(cfg)} counted as read")
        return None, collate_examples(first)["examples"] if first else []
    from seqcpo.data import load_splits

    splits = load_splits(cfg.data_config(), tokenizer, context_tokens=context)
    plan.add("data", f"{cfg.dataset} ({splits.stats.get('task', cfg.task)}): {len(splits.train)} train / {len(splits.validation)} validation / "
                     f"{len(splits.test)} test {_unit(cfg)}")
    return splits.train, list(splits.train[:bs])


def _unit(cfg) -> str:
    """What a batch holds: document rows (chunks of documents, ``task: document``) or examples (windows, pairs)."""
    return "rows" if cfg.task == "document" else "examples"


def _steps(cfg, n_train: int | None, plan: Plan) -> None:
    per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * cfg.world_size
    split = (f"batch {cfg.per_device_train_batch_size} x accumulation {cfg.gradient_accumulation_steps} x "
             f"{cfg.world_size} process(es)")
    if cfg.max_steps > 0:
        steps = cfg.max_steps
        epochs = f", {steps * per_step / n_train:.2f} epochs" if n_train else ""
    else:
        steps = math.ceil(n_train / per_step) * math.ceil(cfg.num_train_epochs) if n_train else 0
        epochs = f", {cfg.num_train_epochs:g} epochs"
    unit = _unit(cfg)
    plan.add("plan", f"{steps} optimizer steps x {per_step} {unit} ({split}) = {steps * per_step} {unit}{epochs}")


def _first_batch(cfg, model, examples, tokenizer, plan: Plan, offline=None):
    """The first micro-batch as candidates (gold + negatives: ``offline``'s rows with a negatives folder), its
    layout, and the tokens it runs."""
    from seqcpo.batching import candidate_batch
    from seqcpo.logps import choose_layout
    from seqcpo.packing import packed_tokens

    if not examples:
        plan.add("first batch", "no examples")
        return None, 0
    negatives, said = (None, "no negatives") if not cfg.uses_negatives else _negatives(cfg, examples, tokenizer,
                                                                                       offline)
    batch = candidate_batch(examples, negatives)
    layout = cfg.logps_layout
    if layout == "auto":
        layout = f"{choose_layout(model, batch)} (auto)"
    padded, packed = packed_tokens(batch)
    lens = lambda xs: f"{min(xs)}..{max(xs)}"  # noqa: E731
    plan.add("first batch", f"{len(examples)} examples, prefix {lens([len(e.prefix_ids) for e in examples])} tokens, "
                            f"gold {lens([len(e.continuation_ids) for e in examples])}; {said}; layout {layout}; "
                            f"{packed} tokens in prefix-shared rows ({padded} padded)")
    return batch, padded


def _first_rows(cfg, examples, plan: Plan) -> int:
    """Document rows: the first micro-batch's rows, their anchors (drawn from each row's own generator, seeded by
    (seed, row id, epoch 0, "anchors") as the trainer's first step draws them) and the tokens of its one forward
    pass, rows plus branches with every negative at its longest (:func:`document_tokens`); returns those tokens."""
    from seqcpo.document_rows import anchor_count, choose_anchors, document_tokens
    from seqcpo.seeding import example_generators

    if not examples:
        plan.add("first batch", "no rows")
        return 0
    rows = [list(e.prefix_ids) + list(e.continuation_ids) for e in examples]
    row_tokens = sum(len(r) for r in rows)
    lengths = f"{len(rows)} rows of {', '.join(str(len(r)) for r in rows)} tokens (max_length {cfg.max_length})"
    if not cfg.uses_negatives:  # MLE alone: the rows run as gold-only candidates (seqcpo.batching)
        from seqcpo.batching import candidate_batch
        from seqcpo.packing import packed_tokens

        padded, _ = packed_tokens(candidate_batch(examples, None))
        plan.add("first batch", f"{lengths}; MLE on every row token, no anchors; {row_tokens} row tokens "
                                f"({padded} padded)")
        return padded
    plan.add("first batch", f"{lengths}, packed in one sequence, attention never crossing rows")
    C, K = cfg.continuation_tokens, cfg.num_negatives
    counts = [anchor_count(len(r), C, cfg.anchors_per_row, cfg.anchor_stride) for r in rows]
    rngs = example_generators(cfg.seed, [str(e.meta.get("id", i)) for i, e in enumerate(examples)], 0, "anchors")
    anchors = [choose_anchors(len(r), C, cfg.anchors_per_row, cfg.anchor_stride, g) for r, g in zip(rows, rngs)]
    L = max(cfg.an_max_new_tokens if name == "an" else C for name, _ in cfg.negatives_parts)
    tokens, windows = document_tokens(rows, anchors, K, C, L)
    rule = f"one every {cfg.anchor_stride} tokens" if cfg.anchor_stride else f"anchors_per_row {cfg.anchors_per_row}"
    M = sum(counts)
    plan.add("anchors", f"{', '.join(map(str, counts))} per row ({rule}, continuation_tokens {C}) = {M} anchors, "
                        f"each with K = {K} negatives of at most {L} tokens")
    plan.add("forward", f"{row_tokens} row tokens + {M} x {K} x {L} = {tokens - row_tokens} branch tokens = {tokens} "
                        f"tokens in one pass (the same anchors as full-prefix windows: {windows})")
    return tokens


def _negatives(cfg, examples, tokenizer, offline=None):
    """The first batch's negatives: read from the negatives folder (``offline``), else TN / BN made and AN / MN
    stood in for by their longest length."""
    from seqcpo.negatives import build_negative_generator
    from seqcpo.seeding import example_generators
    from seqcpo.types import Negatives

    if offline is not None:
        from seqcpo.batching import negatives_from_offline

        ids = [str(e.meta.get("id", i)) for i, e in enumerate(examples)]
        missing = [i for i in ids if i not in offline]
        if missing:  # as the run's stream says it (seqcpo.data.streaming)
            from seqcpo.data import DataError

            raise DataError(f"negatives_path {cfg.negatives_path} has no row for example id {missing[0]}; re-run "
                            "`seqcpo negatives` with the same data settings")
        negatives, _ = negatives_from_offline([offline[i] for i in ids])
        return negatives, f"fixed negatives read from {cfg.negatives_path} (K = {cfg.num_negatives})"
    parts = cfg.negatives_parts
    if "data" in dict(parts):
        from seqcpo.negatives.data import check_data_examples

        check_data_examples(examples)  # as the run checks its training split
    free = [(n, c) for n, c in parts if n in ("tn", "bn")]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = [[] for _ in examples]
    if free:
        gen = build_negative_generator(free, sum(c for _, c in free), eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=pad, options=cfg.negative_options())
        rngs = example_generators(cfg.seed, [str(e.meta.get("id", i)) for i, e in enumerate(examples)], 0, "negatives")
        made = gen(examples, sum(c for _, c in free), rngs)
        ids = [list(row) for row in made.ids]
    for name, count in parts:
        if name in ("an", "mn"):
            for row, e in zip(ids, examples):
                n = cfg.an_max_new_tokens if name == "an" else len(e.continuation_ids)
                row += [[pad] * n for _ in range(count)]
    said = ", ".join(f"{n} x{c}" + (" (made)" if n in ("tn", "bn") else " (longest length)") for n, c in parts)
    k = cfg.num_negatives
    return Negatives(ids=ids, valid=[[True] * k for _ in ids], scores=None, sources=[[""] * k for _ in ids]), said


def _memory(cfg, model, tokens: int, plan: Plan) -> None:
    """Rough bytes per process: weights, gradients and AdamW's two moments of the trainable parameters, the
    frozen reference, and the activations kept for backward: about (8 h + 3 f) values per token per layer
    (h hidden, f MLP width; h per layer with gradient checkpointing) plus the chunked LM head."""
    config = model.config
    wbytes = DTYPE_BYTES.get(cfg.model_dtype, 4)
    abytes = 2 if (cfg.bf16 or cfg.fp16) else wbytes
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    mem = plan.memory
    mem["weights"] = total * wbytes
    mem["gradients"] = trainable * wbytes
    mem["AdamW"] = 2 * trainable * wbytes
    if cfg.uses_negatives and not cfg.lora and cfg.reference in ("auto", "frozen_copy") and not cfg.negatives_path:
        mem["reference"] = total * DTYPE_BYTES.get(cfg.reference_dtype or cfg.model_dtype, 4)
    if cfg.uses_negatives and cfg.negatives_model == "policy" and cfg.negatives_refresh_steps > 1:
        mem["policy snapshot"] = total * wbytes
    h = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    f = getattr(config, "intermediate_size", None) or 4 * h
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    per_token = h if cfg.gradient_checkpointing else 8 * h + 3 * f
    head = cfg.logits_chunk_size * (getattr(config, "vocab_size", 0) or 0) * 4 * 2
    mem["activations"] = tokens * layers * per_token * abytes + head
    parts = " + ".join(f"{k} {v / GB:.2f}" for k, v in mem.items())
    plan.add("memory", f"rough, per process: {parts} = {sum(mem.values()) / GB:.2f} GB "
                       f"(bf16/fp16 autocast: {bool(cfg.bf16 or cfg.fp16)})")


def render(plan: Plan) -> str:
    width = max(len(k) for k, _ in plan.lines)
    out = ["seqcpo train --dry-run (nothing trained, no weights loaded):"]
    out += [f"  {k:<{width}}  {v}" for k, v in plan.lines]
    return "\n".join(out)
