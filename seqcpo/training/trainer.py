"""A thin ``transformers.Trainer`` that composes the core: negatives -> log-probs -> loss.

Per training step (docs/method.md, "The objective"):

1. the batch's gold examples get K negatives: read from a fixed offline set (``negatives_path``) or made now
   by the configured generators, each example's draws seeded by (seed, example id, epoch) (:mod:`seqcpo.seeding`),
   so an example's negatives do not depend on the batch size, the accumulation, the number of processes or the
   step a run resumed from (BN excepted: it draws from its batch by definition);
2. the policy scores gold + negatives (:mod:`seqcpo.logps`): in the prefix-shared layout, or in two passes
   (:mod:`seqcpo.two_pass`) when its negatives share long beginnings with the gold; ``logps_layout: auto``
   chooses per batch (:func:`seqcpo.logps.choose_layout`);
3. the reference scores them too (frozen copy, adapter disabled, or precomputed log-probs);
4. ``L = mle_weight * L_mle(gold) + lambda * L_cpo`` (or MLE / DPO / PSS alone), with the metrics of
   :func:`seqcpo.losses.preference_metrics` logged beside it.

Split-invariant steps. One optimizer step's loss is the same function of its examples however they
are split into micro-batches (``gradient_accumulation_steps``) and processes:

- the MLE and PSS terms are the SUM of the gold tokens' losses divided by the number of gold target tokens in
  the whole step (transformers' ``num_items_in_batch`` convention, counted by :meth:`get_batch_samples` over the
  step's micro-batches and all-reduced over processes; ``average_tokens_across_devices`` is not consulted:
  the count is always global, else the step would depend on the split);
- the CPO / DPO terms are the sum of per-example losses divided by the number of examples in the step;
- each micro-batch's loss is multiplied by the number of processes, since DDP / FSDP / DeepSpeed average the
  processes' gradients, and is not divided again by the accumulation steps (``loss_is_scaled_for_ga``);
- a final partial step (fewer micro-batches, or a shorter last batch) divides by what it holds.

Evaluation (``eval_loss``) is the plain per-batch mean (token mean for MLE/PSS, example mean for CPO), averaged
over batches by transformers; the ``eval_*`` metrics are pooled over the whole evaluation set.

With MN negatives and ``logps_layout: auto`` (the default), the model that makes them is scored in two passes:
its gold-branch pass gives both its gold log-probs and the logits MN draws from, so MN costs no forward pass of
its own. That model is the live reference by default, or the policy with ``negatives_model: policy`` (and
``negatives_refresh_steps: 1``).

Logged metrics: ``loss``, ``loss/mle``, ``loss/cpo``, ``rewards/chosen``, ``rewards/rejected``,
``rewards/margins``, ``rewards/accuracies``, ``rewards/strongest_rejected``, ``rewards/gold_top1``,
``logps/chosen``, ``logps/rejected``, ``negatives/dropped`` (fraction of negatives masked because they equalled
the gold), and for PSS ``pss/mix_fraction``. Each is the whole optimizer step's value, pooled over its
micro-batches and processes with the right weights (tokens for ``loss/mle`` and ``pss/mix_fraction``, examples
or valid negatives for the others, see :func:`seqcpo.losses.preference_metric_sums`), then averaged over the
steps since the last log, as transformers does for ``loss``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from typing import Any

import torch
from transformers import Trainer

from seqcpo.batching import (  # noqa: F401  (ExampleDataset, collate_examples: importable from here as before)
    ExampleDataset,
    StepCounts,
    _negatives_from_offline,
    candidate_batch,
    collate_examples,
    local_step_counts,
    target_tokens,
)
from seqcpo.logps import choose_layout, sequence_logps, unwrap_model
from seqcpo.losses import PREFERENCE_METRICS, cpo_loss_per_example, preference_metric_sums
from seqcpo.negatives import build_negative_generator, uses_gold_logits
from seqcpo.reference import AdapterDisabledReference, FrozenCopyReference, build_reference
from seqcpo.seeding import example_generators
from seqcpo.two_pass import gold_pass, negatives_pass, two_pass_supported
from seqcpo.training.checkpoints import NonFiniteGuard, finite_logs, save_complete_checkpoint
from seqcpo.training.config import SeqCPOConfig
from seqcpo.types import CandidateBatch, Example, Negatives

# the layouts `auto` may choose for the policy (seqcpo.logps.choose_layout)
AGREED_LAYOUTS = ("shared", "packed", "two_pass")


class SeqCPOTrainer(Trainer):
    """Trainer for MLE, CPO, ranked CPO, DPO and PSS on (prefix, continuation) examples.

    Args:
        model: the policy (a transformers causal LM, optionally a peft model).
        args: :class:`SeqCPOConfig`.
        reference_model: optional separately loaded starting model for the frozen-copy reference (saves a
            deep copy); by default the policy is copied at construction, i.e. before any training step.
        offline_meta: the manifest of ``negatives_path`` when negatives are fixed.
    """

    def __init__(self, model, args: SeqCPOConfig, *, reference_model=None, offline_meta: dict | None = None, **kwargs):
        kwargs.setdefault("data_collator", collate_examples)
        super().__init__(model=model, args=args, **kwargs)
        # compute_loss divides by the whole step's counts (StepCounts): the loss is already scaled for accumulation
        self.loss_is_scaled_for_ga = True
        self.cfg = args
        tok = self.processing_class
        self.pad_token_id = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
        self.eos_token_id = tok.eos_token_id if tok is not None else unwrap_model(model).config.eos_token_id
        # metrics: {name: [sum, count]} of the open step (train) or of the evaluation (eval); finished steps'
        # values are summed in _window until the next log (see log())
        self._metric_names = self._logged_metric_names()
        self._pool: dict[str, dict[str, list[float]]] = {"train": {}, "eval": {}}
        self._window = torch.zeros((2, len(self._metric_names)), dtype=torch.float64)  # (sum of values, steps)
        self._epoch = 0  # the epoch of the step being run: seeds its examples' draws (seqcpo.seeding)
        self.offline_meta = offline_meta
        self.reference = None
        self.generator = None
        self._policy_snapshot = None
        self._snapshot_step = -1
        # Sharded weights (FSDP, ZeRO-3) exist only inside forward: the LM head must run there too.
        self.head_in_forward = bool(self.is_fsdp_enabled or self.is_deepspeed_enabled)
        # "auto": per batch, the two-pass layout where it runs fewer tokens (negatives sharing the gold's start)
        # and the prefix-shared row otherwise (seqcpo.logps.choose_layout); the model making MN negatives runs in
        # two passes (see the module docstring)
        self.layout = args.logps_layout
        self._checkpointing = bool(getattr(args, "activation_checkpointing", False) or args.gradient_checkpointing)
        if self.layout == "two_pass" and (self.head_in_forward or self._checkpointing or not two_pass_supported(model)):
            raise ValueError(
                "logps_layout two_pass needs the LM head outside the model's forward and a KV cache in training: "
                "it cannot run with FSDP / DeepSpeed ZeRO-3 or gradient checkpointing; use 'auto' or 'shared'"
            )
        if self.layout == "packed" and self.head_in_forward:
            raise ValueError("logps_layout packed needs the LM head outside the model's forward: it cannot run with "
                             "FSDP / DeepSpeed ZeRO-3; use 'auto' or 'shared'")
        logps_options = dict(
            layout=self.layout,
            pad_token_id=self.pad_token_id,
            length_normalize=args.length_normalize,
            chunk_size=args.logits_chunk_size,
        )
        if args.uses_negatives:
            offline = args.negatives_path is not None
            ref_dtype = getattr(torch, args.reference_dtype) if args.reference_dtype else None
            self.reference = build_reference(
                args.reference,
                model,
                negatives_offline=offline,
                offline_has_ref_logps=bool(offline_meta and offline_meta.get("has_ref_logps")),
                reference_model=reference_model,
                reference_dtype=ref_dtype,
                **logps_options,
            )
            if not offline:
                if args.resolved_an_backend() == "vllm" and args.world_size > 1:
                    raise ValueError(
                        "an_backend vllm runs one engine in one process: with several training processes make the "
                        "AN negatives first with `seqcpo negatives` (it uses vLLM) and train with negatives_path"
                    )
                gen_model = self._negatives_model()
                self.generator = build_negative_generator(
                    args.negatives,
                    args.num_negatives,
                    model=gen_model,
                    eos_token_id=self.eos_token_id,
                    pad_token_id=self.pad_token_id,
                    options=args.negative_options(),
                )
        self.mn_source = self._mn_source()
        self.finite_guard = NonFiniteGuard()  # stops at a NaN/inf loss or gradient norm (checkpoints.py)

    def _logged_metric_names(self) -> list[str]:
        """The metrics this objective logs (the same on every process, so their sums can be all-reduced)."""
        if self.cfg.objective == "pss":
            return ["loss/mle", "pss/mix_fraction"]
        if not self.cfg.uses_negatives:
            return ["loss/mle"]
        return [*PREFERENCE_METRICS, "loss/mle", "loss/cpo", "negatives/dropped"]

    def _pooled(self, mode: str, device, extra: list[float] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """``extra`` and this mode's metric (sums, counts), summed over processes (one all-reduce), and the
        pool emptied: returns ``(extra, (2, metrics))``."""
        pool = self._pool[mode]
        rows = [[pool.get(n, (0.0, 0.0))[j] for n in self._metric_names] for j in (0, 1)]
        t = torch.tensor([*extra, *rows[0], *rows[1]], dtype=torch.float64, device=device)
        if self.accelerator.num_processes > 1:
            t = self.accelerator.reduce(t, reduction="sum")
        self._pool[mode] = {}
        t = t.cpu()
        return t[: len(extra)], t[len(extra) :].view(2, -1)

    def _close_step(self, sums_counts: torch.Tensor) -> None:
        """Adds a finished step's metric values (sum / count, where counted) to the logging window."""
        total, count = sums_counts
        seen = count > 0
        self._window[0] += torch.where(seen, total / count.clamp(min=1), torch.zeros_like(total))
        self._window[1] += seen.double()

    def get_train_dataloader(self):
        # a streamed corpus (seqcpo.data.streaming) is already this process's shard, read in this process (its
        # stored position must stay visible to the checkpoint callback): accelerate must not shard or dispatch it
        if getattr(self.train_dataset, "is_process_shard", False):
            from torch.utils.data import DataLoader

            return DataLoader(self.train_dataset, batch_size=self._train_batch_size, collate_fn=self.data_collator)
        return super().get_train_dataloader()

    def _mn_source(self) -> str | None:
        """Which model's gold-branch pass MN negatives are drawn from: "reference", "policy" or None (MN, if
        any, runs its own forward pass)."""
        cfg = self.cfg
        if self.generator is None or not uses_gold_logits(self.generator) or cfg.logps_layout not in ("auto", "two_pass"):
            return None
        if self.head_in_forward:
            return None
        if cfg.negatives_model == "reference":
            return "reference" if isinstance(self.reference, (FrozenCopyReference, AdapterDisabledReference)) else None
        if cfg.negatives_refresh_steps <= 1 and not self._checkpointing and two_pass_supported(self.model):
            return "policy"  # the policy as it stands: its own training forward gives the logits
        return None

    # ---- negatives
    def _negatives_model(self):
        """The model that makes AN/MN negatives: the reference (default) or the policy."""
        if self.cfg.negatives_model == "policy":
            return _ModelView(self.policy_for_negatives)
        if isinstance(self.reference, FrozenCopyReference):
            return self.reference.model
        if isinstance(self.reference, AdapterDisabledReference):
            peft_model = self.reference.model
            # the adapter-off policy is the starting model (docs/method.md: negatives from the reference)
            return _ModelView(lambda: peft_model, peft_model.disable_adapter)
        return unwrap_model(self.model)

    def policy_for_negatives(self):
        """The policy as it stands, or a snapshot refreshed every ``negatives_refresh_steps`` steps."""
        policy = unwrap_model(self.model)
        n = self.cfg.negatives_refresh_steps
        if n <= 1:
            return policy
        step = self.state.global_step
        if self._policy_snapshot is None or step - self._snapshot_step >= n:
            self._policy_snapshot = copy.deepcopy(policy).eval().requires_grad_(False)
            self._snapshot_step = step - step % n
        return self._policy_snapshot

    # ---- seeds and step counts
    def example_rngs(self, ids, training: bool, purpose: str, epochs=None) -> list[torch.Generator]:
        """One generator per example, seeded by (seed, example id, epoch, purpose) (:mod:`seqcpo.seeding`).

        Training uses the epoch each example was drawn in (``epochs``, carried by a streaming dataset) or the
        current step's; evaluation uses epoch 0 and its own purposes, so every evaluation draws the same
        validation negatives and never moves a training stream.
        """
        if not training:
            return example_generators(self.cfg.seed, ids, 0, f"eval/{purpose}")
        return example_generators(self.cfg.seed, ids, self._epoch if epochs is None else epochs, purpose)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The step's micro-batches and its :class:`~seqcpo.batching.StepCounts` (gold target tokens and
        examples over the micro-batches of every process), which ``compute_loss`` divides by.

        Called by transformers once per optimizer step, before its micro-batches run (``num_items_in_batch``).
        """
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        # one all-reduce: this step's counts, and the metric sums of the previous step if no log took them
        anchors = None
        if self.cfg.task == "document" and self.cfg.uses_negatives:  # the CPO term averages over anchors
            from seqcpo.training.document_step import anchor_counter

            anchors = anchor_counter(self.cfg)
        counts, previous = self._pooled("train", device, extra=local_step_counts(batches, anchors))
        self._close_step(previous)
        tokens, examples = (int(x) for x in counts.tolist())
        self._epoch = int(math.floor(self.state.epoch or 0))  # the epoch this step belongs to
        return batches, StepCounts(tokens=tokens, examples=examples)

    def evaluate(self, *args, **kwargs):
        self._pool["eval"] = {}  # one pool for the whole evaluation
        return super().evaluate(*args, **kwargs)

    def make_negatives(self, examples: list[Example], training: bool = True, gold_logits=None, epochs=None) -> Negatives:
        """K negatives per example, each example's draws from its own generator (:meth:`example_rngs`); an
        example without ``meta["id"]`` is seeded by its position."""
        ids = [str(e.meta.get("id", i)) for i, e in enumerate(examples)]
        rngs = self.example_rngs(ids, training, "negatives", epochs)
        extra = {"gold_logits": gold_logits} if gold_logits is not None else {}
        return self.generator(examples, self.cfg.num_negatives, rngs, ranked=self.cfg.ranked, **extra)

    # ---- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The micro-batch's share of the step's loss (see the module docstring).

        ``num_items_in_batch``: the step's :class:`~seqcpo.batching.StepCounts` in training; without it (evaluation,
        a direct call) the loss is this batch's own mean.
        """
        mode = "train" if model.training else "eval"
        training = mode == "train"
        epochs = inputs.get("epochs")
        examples = [
            Example(prefix_ids=p, continuation_ids=c, meta={"id": i})
            for p, c, i in zip(inputs["prefix_ids"], inputs["continuation_ids"], inputs["ids"])
        ]
        n_tokens = sum(target_tokens(e.prefix_ids, e.continuation_ids) for e in examples)
        if isinstance(num_items_in_batch, StepCounts):
            # DDP/FSDP/DeepSpeed average the processes' gradients: scale back to a sum over processes
            scale = self.accelerator.num_processes
            tokens_norm, examples_norm = max(num_items_in_batch.tokens, 1), max(num_items_in_batch.examples, 1)
        else:
            scale, tokens_norm, examples_norm = 1, max(n_tokens, 1), max(len(examples), 1)
        cfg = self.cfg
        sums: dict[str, tuple[float, float]] = {}
        if cfg.objective == "pss":
            from seqcpo.pss import pss_loss, pss_mix_probability

            p_model = pss_mix_probability(self.state.global_step, cfg.pss_p_gold, cfg.pss_warmup_steps)
            nll, frac = pss_loss(
                model, examples, p_model=p_model, passes=cfg.pss_passes,
                generator=self.example_rngs(inputs["ids"], training, "pss", epochs),
                pad_token_id=self.pad_token_id, reduction="sum",
            )
            loss = nll * (scale / tokens_norm)
            sums["loss/mle"] = (nll.item(), n_tokens)
            sums["pss/mix_fraction"] = (round(frac * n_tokens), n_tokens)
        elif not cfg.uses_negatives:
            golds = candidate_batch(examples, None)
            out = sequence_logps(
                model, golds, layout="shared" if self.layout == "two_pass" else self._agreed_layout(model, golds),
                pad_token_id=self.pad_token_id,
                chunk_size=cfg.logits_chunk_size, head_in_forward=self.head_in_forward,
            )
            nll = -out.summed[:, 0].float().sum()
            loss = nll * (scale / tokens_norm)
            sums["loss/mle"] = (nll.item(), n_tokens)
        elif cfg.task == "document":  # MLE on every row token, CPO at anchors (seqcpo.training.document_step)
            from seqcpo.training.document_step import document_loss

            loss, doc_sums = document_loss(self, model, inputs, num_items_in_batch)
            sums.update(doc_sums)
        else:
            batch, out, ref = self._score(model, inputs, examples, training=training)
            ref = ref.to(out.logps.device)
            mask = torch.tensor(batch.candidate_mask, dtype=torch.bool, device=out.logps.device)
            nll = -out.summed[:, 0].float().sum()
            cpo = cpo_loss_per_example(out.logps, ref, cfg.beta, ranked=cfg.ranked, mask=mask).sum()
            loss = (cfg.mle_weight * nll / tokens_norm + cfg.cpo_lambda * cpo / examples_norm) * scale
            sums.update(preference_metric_sums(out.logps.detach(), ref, cfg.beta, mask=mask))
            sums["loss/mle"] = (nll.item(), n_tokens)
            sums["loss/cpo"] = (cpo.item(), len(examples))
            n_neg = mask[:, 1:].numel()
            sums["negatives/dropped"] = (float(n_neg - int(mask[:, 1:].sum())), n_neg)
        pool = self._pool[mode]
        for k, (total, count) in sums.items():
            acc = pool.setdefault(k, [0.0, 0.0])
            acc[0] += float(total)
            acc[1] += float(count)
        return (loss, {"loss": loss.detach()}) if return_outputs else loss

    def _score(self, model, inputs, examples: list[Example], training: bool):
        """Negatives, then the policy's and the reference's (B, K+1) log-probs: ``(batch, out, ref)``."""
        cfg = self.cfg
        opts = dict(pad_token_id=self.pad_token_id, chunk_size=cfg.logits_chunk_size)
        if inputs.get("offline") is not None:
            negatives, ref_pre = _negatives_from_offline(inputs["offline"])
            batch = candidate_batch(examples, negatives, ref_pre)
            return batch, self._policy_logps(model, batch), self.reference.logps(batch)
        prefixes = [e.prefix_ids for e in examples]
        golds = [e.continuation_ids for e in examples]
        epochs = inputs.get("epochs")
        if self.mn_source == "reference":
            # one reference pass over x + y_0 gives the reference's gold log-probs and MN's logits
            rgp = self.reference.gold_pass(prefixes, golds, want_logits=True)
            negatives = self.make_negatives(examples, training, gold_logits=rgp.gold_logits, epochs=epochs)
            batch = candidate_batch(examples, negatives)
            return batch, self._policy_logps(model, batch), self.reference.finish(rgp, negatives.ids)
        if self.mn_source == "policy":
            # the policy's own gold-branch pass (with gradient) gives its gold log-probs and MN's logits
            gp = gold_pass(model, prefixes, golds, want_logits=True, **opts)
            negatives = self.make_negatives(examples, training, gold_logits=gp.gold_logits, epochs=epochs)
            out = negatives_pass(model, gp, negatives.ids, length_normalize=cfg.length_normalize, **opts)
            batch = candidate_batch(examples, negatives)
            return batch, out, self.reference.logps(batch)
        batch = candidate_batch(examples, self.make_negatives(examples, training, epochs=epochs))
        return batch, self._policy_logps(model, batch), self.reference.logps(batch)

    def _policy_logps(self, model, batch: CandidateBatch):
        cfg = self.cfg
        return sequence_logps(
            model, batch, layout=self._agreed_layout(model, batch), pad_token_id=self.pad_token_id,
            length_normalize=cfg.length_normalize, chunk_size=cfg.logits_chunk_size,
            head_in_forward=self.head_in_forward,
        )

    def _agreed_layout(self, model, batch: CandidateBatch) -> str:
        """``logps_layout`` for this batch; with ``auto`` under several processes, one choice for all of them.

        Every process must run the same layout: the two-pass layout calls the wrapped model twice and each DDP
        forward is a collective (buffer broadcast, gradient hooks), so two processes choosing differently per batch
        wait on each other forever. A layout every process chose is kept; otherwise "shared" (same numbers)."""
        if self.layout != "auto":
            return self.layout
        choice = choose_layout(model, batch, head_in_forward=self.head_in_forward)
        if self.accelerator.num_processes == 1:
            return choice
        votes = torch.zeros(len(AGREED_LAYOUTS), dtype=torch.float32, device=self.accelerator.device)
        votes[AGREED_LAYOUTS.index(choice)] = 1.0
        votes = self.accelerator.reduce(votes, reduction="sum")
        return choice if int(votes[AGREED_LAYOUTS.index(choice)].item()) == self.accelerator.num_processes else "shared"

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the pooled metrics. Train: each step's value is sum / count over its micro-batches and processes,
        averaged over the steps since the last log. Eval: sum / count over the whole evaluation. Runs on every
        process (transformers logs on all of them): one all-reduce."""
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        _, sums_counts = self._pooled(mode, self.args.device)
        if mode == "train":
            self._close_step(sums_counts)
            total, count = self._window
            self._window = torch.zeros_like(self._window)
        else:
            total, count = sums_counts
        prefix = "eval_" if mode == "eval" else ""
        for name, t, c in zip(self._metric_names, total.tolist(), count.tolist()):
            if c > 0:
                logs[f"{prefix}{name}"] = round(t / c, 6)
        super().log(finite_logs(logs), start_time)

    # ---- run safety (seqcpo.training.checkpoints): finite steps, checkpoints marked complete
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.finite_guard.note_loss(loss)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self.finite_guard.check(grad_norm, self)  # before the optimizer step: weights never turn NaN
        return grad_norm

    def _save_checkpoint(self, model, trial):
        save_complete_checkpoint(self, super()._save_checkpoint, model, trial)

    # ---- saving
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            from seqcpo.training.model_card import write_model_card
            from seqcpo.training.config import save_config

            write_model_card(output_dir, self.cfg)
            save_config(self.cfg, os.path.join(output_dir, "seqcpo_config.yaml"))


class _ModelView(torch.nn.Module):
    """A model looked up at each call (``get_model``) and run inside ``context`` (e.g. adapter disabled), for
    generators built once at construction. The model is held in a closure, not registered as a submodule."""

    def __init__(self, get_model, context=contextlib.nullcontext):
        super().__init__()
        self._get = get_model
        self._context = context

    @property
    def config(self):
        return self._get().config

    def parameters(self, recurse: bool = True):
        return self._get().parameters(recurse)

    def forward(self, *args, **kwargs):
        with self._context():
            return self._get()(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with self._context():
            return self._get().generate(*args, **kwargs)
