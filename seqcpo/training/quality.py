"""Generation quality while training: every ``eval_steps`` the policy continues a fixed slice of held-out prefixes
and the Trainer's loggers get ``quality/*`` metrics beside the loss and the separation metrics.

What is logged (each a plain scalar, so TensorBoard, W&B and ``log_history.json`` all take it):

- ``quality/rouge_l``: mean ROUGE-L F of each continuation against its gold;
- ``quality/similarity``: mean cosine between MiniLM embeddings of continuation and gold (``quality_embeddings``);
- ``quality/repetition``: mean share of repeated 4-grams within a continuation (lower is better);
- ``quality/distinct_2``: unique bigrams over all bigrams, pooled over the slice;
- ``quality/mean_words``: mean continuation length in words;
- ``quality/mauve``: MAUVE of the continuations against the golds (MiniLM features), only when the slice has at
  least :data:`MAUVE_MIN_ITEMS` items (smaller slices give no usable MAUVE).

A few continuations are also written beside the gold to ``OUTPUT_DIR/quality_samples.jsonl`` (and to TensorBoard
as text when it is a logger), so a person can read what the numbers mean. The file follows the run, not the
process: a fresh run starts it empty, and a resumed run drops the rows of steps after its checkpoint (they are
written again as training passes them), so an interrupted run leaves each step once, as an uninterrupted one does.

The slice is the first ``quality_examples`` items of ``quality_split`` (validation by default), decoded greedily,
so two evaluations differ only because the model did. Generation runs on the main process with the unwrapped
model under ``torch.no_grad`` and restores the RNG state afterwards: training with and without this callback gives
the same weights. Sharded models (FSDP, ZeRO-3) hold no whole weights outside their forward, so the callback is
refused there.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Sequence

import numpy as np
import torch
from transformers import TrainerCallback

from seqcpo.decoding import DecodingConfig
from seqcpo.types import Example

logger = logging.getLogger("seqcpo")

MAUVE_MIN_ITEMS = 100
SAMPLES_FILE = "quality_samples.jsonl"


def generation_quality(generations: Sequence[str], golds: Sequence[str], embeddings: bool = True) -> dict[str, float]:
    """The ``quality/*`` metrics of continuations against their golds (same order, same length).

    >>> q = generation_quality(["a b a b a b", "the cat sat"], ["a b c d", "the cat sat"], embeddings=False)
    >>> round(q["quality/repetition"], 4), q["quality/mean_words"]
    (0.3333, 4.5)
    """
    from seqcpo.evaluation.metrics import distinct_n, repeated_ngram_rate, rouge_l, words

    if len(generations) != len(golds):
        raise ValueError(f"{len(generations)} generations but {len(golds)} golds")
    out = {
        "quality/rouge_l": rouge_l(generations, golds),
        "quality/repetition": repeated_ngram_rate(generations, 4),
        "quality/distinct_2": distinct_n(generations, 2),
        "quality/mean_words": float(np.mean([len(words(g)) for g in generations])) if generations else 0.0,
    }
    if embeddings and generations:
        from seqcpo.evaluation.metrics import minilm_features

        feats = minilm_features([*generations, *golds], progress=False, device="cpu")
        feats = feats / np.clip(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12, None)
        gen, gold = feats[: len(generations)], feats[len(generations):]
        out["quality/similarity"] = float(np.mean(np.sum(gen * gold, axis=1)))
        if len(generations) >= MAUVE_MIN_ITEMS:
            from seqcpo.evaluation.metrics import mauve_score

            out["quality/mauve"] = mauve_score(gold, gen).score
    return {k: round(float(v), 6) for k, v in out.items()}


class QualityCallback(TrainerCallback):
    """Generates on ``examples`` at step 0 and every ``every`` optimizer steps; logs :func:`generation_quality`.

    Args:
        trainer: the :class:`~seqcpo.training.trainer.SeqCPOTrainer` (its model, tokenizer and loggers).
        examples: the fixed slice, as :class:`Example` (prefix ids, gold continuation ids).
        every: optimizer steps between two evaluations (``eval_steps``).
        max_new_tokens: continuation length cap (the gold's length in tokens by default of the caller).
        embeddings: add the MiniLM similarity (and MAUVE for large slices).
        samples: how many items are written out as text each time.
        batch_size: prefixes per ``generate`` call.
    """

    def __init__(self, trainer, examples: Sequence[Example], every: int, max_new_tokens: int,
                 embeddings: bool = True, samples: int = 3, batch_size: int = 32):
        if every < 1:
            raise ValueError(f"eval_steps must be >= 1 for generation quality, got {every}")
        if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
            raise ValueError("generation quality during training (quality_examples > 0) cannot run with FSDP or "
                             "DeepSpeed (sharded weights); set quality_examples 0 and use `seqcpo eval` on checkpoints")
        self.trainer, self.examples, self.every = trainer, list(examples), every
        self.decoding = DecodingConfig(strategy="greedy", max_new_tokens=max_new_tokens, name="greedy")
        self.embeddings, self.samples, self.batch_size = embeddings, samples, batch_size
        self._done_steps: set[int] = set()

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer.is_world_process_zero():
            keep_samples_up_to(os.path.join(args.output_dir, SAMPLES_FILE), state.global_step)
        if state.global_step == 0:  # a resumed run logged its start already
            self.evaluate(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.evaluate(state.global_step)

    def continuations(self) -> tuple[list[str], list[str], list[str]]:
        """(prompts, golds, continuations) of the slice, greedy, with the current weights."""
        from seqcpo.evaluation.generate import eos_ids_of, example_texts, generate_batch

        trainer = self.trainer
        tok = trainer.processing_class
        model = trainer.accelerator.unwrap_model(trainer.model)
        was_training = model.training
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        model.eval()
        try:
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            eos = eos_ids_of(model, tok)
            new: list[list[int]] = []
            for i in range(0, len(self.examples), self.batch_size):
                chunk = self.examples[i:i + self.batch_size]
                new += generate_batch(model, [e.prefix_ids for e in chunk], self.decoding, pad, eos)
        finally:
            model.train(was_training)
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
        texts = [example_texts(e, tok) for e in self.examples]
        return ([p for p, _ in texts], [g for _, g in texts],
                [tok.decode(ids, skip_special_tokens=True) for ids in new])

    def evaluate(self, step: int) -> dict[str, float] | None:
        """Generate, score and log once per step (main process only; no collective call, so the other
        processes need not wait for it)."""
        if step in self._done_steps or not self.trainer.is_world_process_zero():
            return None
        self._done_steps.add(step)
        prompts, golds, gens = self.continuations()
        metrics = generation_quality(gens, golds, embeddings=self.embeddings)
        import dataclasses

        from transformers import Trainer

        # the base log (ours all-reduces the step metrics); its on_log clears should_log, which the step's own log
        # (decided before this callback ran) still needs: the flags are put back
        control = self.trainer.control
        flags = dataclasses.asdict(control)
        Trainer.log(self.trainer, dict(metrics))
        for key, value in flags.items():
            setattr(control, key, value)
        self._write_samples(step, prompts, golds, gens)
        return metrics

    def _write_samples(self, step: int, prompts, golds, gens) -> None:
        rows = [{"step": step, "id": str(e.meta.get("id", i)) if e.meta else str(i), "prompt": p, "gold": g,
                 "generation": c} for i, (e, p, g, c) in enumerate(zip(self.examples, prompts, golds, gens))]
        rows = rows[: self.samples]
        if not rows:
            return
        path = os.path.join(self.trainer.args.output_dir, SAMPLES_FILE)
        with open(path, "a", encoding="utf-8") as f:  # appended: one line per sample, readable while training
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        writer = _tensorboard_writer(self.trainer)
        if writer is not None:
            table = "\n\n".join(f"**{r['id']}** {r['prompt']}\n\n- gold: {r['gold']}\n- model: {r['generation']}"
                                for r in rows)
            writer.add_text("quality/samples", table, step)


def keep_samples_up_to(path: str, step: int) -> None:
    """Drop the rows of ``path`` (a samples file) written after ``step``: all of them for a fresh run (step 0: a
    folder run again from the start), those an interrupted run wrote past its checkpoint for a resumed one."""
    if not os.path.exists(path):
        return
    from seqcpo.io import atomic_write_jsonl

    rows = []
    if step > 0:  # a fresh run keeps nothing: no need to read the file
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # the last line of a run killed while writing
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                    rows.append(row)
    atomic_write_jsonl(path, rows)


def _tensorboard_writer(trainer):
    """The SummaryWriter of the Trainer's TensorBoard logger, when it is one and has opened its writer."""
    for cb in trainer.callback_handler.callbacks:
        writer = getattr(cb, "tb_writer", None)
        if writer is not None:
            return writer
    return None


def quality_every(eval_steps: float, max_steps: int) -> int:
    """``eval_steps`` as a step count (TrainingArguments allows a fraction of ``max_steps`` below 1).

    >>> quality_every(50, 300), quality_every(0.25, 300)
    (50, 75)
    """
    if eval_steps < 1:
        return max(1, int(np.ceil(eval_steps * max(max_steps, 1))))
    return int(eval_steps)


def wants_quality(cfg) -> bool:
    """Whether a run of ``cfg`` (a SeqCPOConfig) logs generation quality."""
    return cfg.eval_steps is not None and cfg.quality_examples > 0


def attach_quality(trainer, cfg, held_out: dict[str, Sequence[Example]]) -> QualityCallback:
    """Add a :class:`QualityCallback` over the first ``quality_examples`` items of ``held_out[quality_split]``."""
    examples = list(held_out.get(cfg.quality_split) or [])[: cfg.quality_examples]
    if not examples:
        raise ValueError(f"quality_split {cfg.quality_split!r} has no examples (validation_size / test_size is 0): "
                         "set it, choose the other split, or set quality_examples 0")
    longest = max(len(e.continuation_ids) for e in examples)
    cb = QualityCallback(trainer, examples, quality_every(cfg.eval_steps, cfg.max_steps), longest,
                         embeddings=cfg.quality_embeddings, samples=cfg.quality_samples)
    trainer.add_callback(cb)
    return cb
