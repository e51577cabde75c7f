"""A thin ``transformers.Trainer`` that composes the core: examples -> negatives -> log-probs -> loss.

Per training step (docs/method.md, "The objective"):

1. the collator hands over the batch's gold :class:`~seqcpo.types.Example` objects
   (:func:`seqcpo.batching.collate_examples`); a ``datasets.Dataset`` of raw records is turned into examples
   first (:mod:`seqcpo.training.records`);
2. :func:`seqcpo.training.scoring.score_examples` gives them K negatives (fixed ones read from
   ``negatives_path``, or made now, each example's draws seeded by (seed, example id, epoch),
   :mod:`seqcpo.seeding`) and the reference's log-probs; MN reuses a gold-branch pass by the one rule of
   :func:`seqcpo.training.scoring.mn_source`;
3. the policy scores gold + negatives (:mod:`seqcpo.logps`) in the layout of
   :mod:`seqcpo.training.policy_layout`;
4. :func:`seqcpo.losses.step_loss` combines ``mle_weight * L_mle(gold) + lambda * L_cpo`` (or MLE / DPO / PSS
   alone) with the step's normalisation, and :mod:`seqcpo.training.step_metrics` pools the logged metrics.

Split-invariant steps. One optimizer step's loss is the same function of its examples however they are split
into micro-batches (``gradient_accumulation_steps``) and processes: :meth:`SeqCPOTrainer.get_batch_samples`
counts the step's gold target tokens and examples over its micro-batches and all processes
(:class:`~seqcpo.batching.StepCounts`, handed to ``compute_loss`` as ``num_items_in_batch``;
``average_tokens_across_devices`` is not consulted: the count is always global), and
:func:`~seqcpo.losses.step_loss` divides the summed MLE / PSS token losses by the tokens and the summed CPO /
DPO example losses by the examples, times the number of processes (DDP / FSDP / DeepSpeed average the
processes' gradients); the loss is not divided again by the accumulation steps (``loss_is_scaled_for_ga``). A
final partial step divides by what it holds. Evaluation (``eval_loss``) is the plain per-batch mean.

Logged metrics: ``loss``, ``loss/mle``, ``loss/cpo``, ``rewards/chosen``, ``rewards/rejected``,
``rewards/margins``, ``rewards/accuracies``, ``rewards/strongest_rejected``, ``rewards/gold_top1``,
``logps/chosen``, ``logps/rejected``, ``negatives/dropped`` (fraction of negatives masked because they equalled
the gold), and for PSS ``pss/mix_fraction``: each step's value pooled over its micro-batches and processes,
averaged over the steps since the last log (:mod:`seqcpo.training.step_metrics`).
"""

from __future__ import annotations

import math
import os

import torch
from transformers import Trainer

from seqcpo.batching import StepCounts, candidate_batch, collate_examples, local_step_counts, target_tokens
from seqcpo.hf_model import unwrap_model
from seqcpo.logps import sequence_logps
from seqcpo.losses import preference_metric_sums, step_loss
from seqcpo.negatives import build_negative_generator
from seqcpo.reference import build_reference
from seqcpo.seeding import example_generators
from seqcpo.two_pass import two_pass_supported
from seqcpo.training.checkpoints import NonFiniteGuard, finite_logs, save_complete_checkpoint
from seqcpo.training.checkpoints.run_loss import RunLossCarry
from seqcpo.training.checkpoints.run_loss import store as store_run_loss
from seqcpo.training.config import SeqCPOConfig
from seqcpo.training.negatives_model import PolicySnapshot, negatives_model
from seqcpo.training.policy_layout import agreed_layout, check_layout
from seqcpo.training.records import example_items
from seqcpo.training.pss_step import pss_terms
from seqcpo.training.scoring import mn_source, preference_term, score_examples
from seqcpo.training.step_metrics import StepMetrics, logged_metric_names
from seqcpo.types import CandidateBatch, Example, Negatives


class SeqCPOTrainer(Trainer):
    """Trainer for MLE, CPO, ranked CPO, DPO and PSS on (prefix, continuation) examples.

    Args:
        model: the policy (a transformers causal LM, optionally a peft model).
        args: :class:`SeqCPOConfig`.
        train_dataset / eval_dataset: items ``{"prefix_ids", "continuation_ids", "id"}``
            (:class:`~seqcpo.batching.ExampleDataset`, a streamed corpus), or a ``datasets.Dataset`` of raw
            records in any format ``seqcpo train`` reads, tokenized with ``processing_class`` by the config's data
            fields (:mod:`seqcpo.training.records`).
        reference_model: optional separately loaded starting model for the frozen-copy reference (saves a
            deep copy); by default the policy is copied at construction, i.e. before any training step.
        offline_meta: the manifest of ``negatives_path`` when negatives are fixed.
        offline_windows: with ``task: document`` and fixed negatives, the folder's rows by window id
            (:class:`~seqcpo.training.offline_reader.OfflineNegatives`): a row's items carry no negatives, its
            anchors' windows are looked up by ``"<row id>@<a>"`` in the step (:mod:`seqcpo.training.document_step`).
    """

    def __init__(self, model, args: SeqCPOConfig, *, reference_model=None, offline_meta: dict | None = None,
                 offline_windows=None, **kwargs):
        kwargs.setdefault("data_collator", collate_examples)
        for key in ("train_dataset", "eval_dataset"):
            if kwargs.get(key) is not None:
                kwargs[key] = example_items(kwargs[key], args, kwargs.get("processing_class"), model, name=key)
        super().__init__(model=model, args=args, **kwargs)
        self.loss_is_scaled_for_ga = True  # step_loss divides by the whole step's counts (StepCounts)
        self.cfg = args
        tok = self.processing_class
        self.pad_token_id = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
        self.eos_token_id = tok.eos_token_id if tok is not None else unwrap_model(model).config.eos_token_id
        processes = self.accelerator.num_processes
        self.metrics = StepMetrics(logged_metric_names(args.objective, args.uses_negatives),
                                   reduce=self._reduce_sum if processes > 1 else None)
        self._epoch = 0  # the epoch of the step being run: seeds its examples' draws (seqcpo.seeding)
        self.offline_meta = offline_meta
        self.offline_windows = offline_windows
        # sharded weights (FSDP, ZeRO-3) exist only inside forward: the LM head must run there too
        self.head_in_forward = bool(self.is_fsdp_enabled or self.is_deepspeed_enabled)
        self._checkpointing = bool(getattr(args, "activation_checkpointing", False) or args.gradient_checkpointing)
        self.layout = args.logps_layout
        check_layout(self.layout, model, head_in_forward=self.head_in_forward, checkpointing=self._checkpointing)
        self.reference, self.generator = None, None
        self._snapshot = PolicySnapshot(args.negatives_refresh_steps)
        if args.uses_negatives:
            self._build_scoring(model, reference_model)
        self.mn_source = mn_source(
            self.generator, layout=args.logps_layout, negatives_model=args.negatives_model, reference=self.reference,
            head_in_forward=self.head_in_forward,
            policy_two_pass=args.negatives_refresh_steps <= 1 and not self._checkpointing and two_pass_supported(model),
        )
        self.finite_guard = NonFiniteGuard()  # stops at a NaN/inf loss or gradient norm (checkpoints.py)
        self.run_loss = RunLossCarry(self)  # train_loss over the whole run across a resume (checkpoints.run_loss)
        self.add_callback(self.run_loss)

    def _build_scoring(self, model, reference_model) -> None:
        """The reference, and the negatives' generator unless the negatives are fixed (``negatives_path``)."""
        args = self.cfg
        offline = args.negatives_path is not None
        self.reference = build_reference(
            args.reference, model, negatives_offline=offline,
            offline_has_ref_logps=bool(self.offline_meta and self.offline_meta.get("has_ref_logps")),
            reference_model=reference_model,
            reference_dtype=getattr(torch, args.reference_dtype) if args.reference_dtype else None,
            layout=self.layout, pad_token_id=self.pad_token_id, length_normalize=args.normalized_logps,
            chunk_size=args.logits_chunk_size,
        )
        if offline:
            return
        if args.resolved_an_backend() == "vllm" and args.world_size > 1:
            raise ValueError(
                "an_backend vllm runs one engine in one process: with several training processes make the "
                "AN negatives first with `seqcpo negatives` (it uses vLLM) and train with negatives_path"
            )
        self.generator = build_negative_generator(
            args.negatives_parts, args.num_negatives,
            model=negatives_model(args.negatives_model, self.reference, model, self.policy_for_negatives),
            eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id, options=args.negative_options(),
        )

    def _reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(t, reduction="sum")

    def get_train_dataloader(self):
        # a streamed corpus (seqcpo.data.streaming) is already this process's shard, read in this process (its
        # stored position must stay visible to the checkpoint callback): accelerate must not shard or dispatch it
        if getattr(self.train_dataset, "is_process_shard", False):
            from torch.utils.data import DataLoader

            return DataLoader(self.train_dataset, batch_size=self._train_batch_size, collate_fn=self.data_collator)
        return super().get_train_dataloader()

    # ---- negatives and seeds
    def policy_for_negatives(self):
        """The policy as it stands, or a snapshot refreshed every ``negatives_refresh_steps`` steps."""
        return self._snapshot(unwrap_model(self.model), self.state.global_step)

    def example_rngs(self, ids, training: bool, purpose: str, epochs=None) -> list[torch.Generator]:
        """One generator per example, seeded by (seed, example id, epoch, purpose) (:mod:`seqcpo.seeding`).

        Training uses the epoch each example was drawn in (``epochs``, carried by a streaming dataset) or the
        current step's; evaluation uses epoch 0 and its own purposes, so every evaluation draws the same
        validation negatives and never moves a training stream.
        """
        if not training:
            return example_generators(self.cfg.seed, ids, 0, f"eval/{purpose}")
        return example_generators(self.cfg.seed, ids, self._epoch if epochs is None else epochs, purpose)

    def make_negatives(self, examples: list[Example], training: bool = True, gold_logits=None, epochs=None) -> Negatives:
        """K negatives per example, each example's draws from its own generator (:meth:`example_rngs`); an
        example without ``meta["id"]`` is seeded by its position."""
        ids = [str(e.meta.get("id", i)) for i, e in enumerate(examples)]
        rngs = self.example_rngs(ids, training, "negatives", epochs)
        extra = {"gold_logits": gold_logits} if gold_logits is not None else {}
        return self.generator(examples, self.cfg.num_negatives, rngs, ranked=self.cfg.ranked, **extra)

    # ---- the step
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
        counts, previous = self.metrics.pooled("train", device, extra=local_step_counts(batches, anchors))
        self.metrics.close_step(previous)
        tokens, examples = (int(x) for x in counts.tolist())
        self._epoch = int(math.floor(self.state.epoch or 0))  # the epoch this step belongs to
        return batches, StepCounts(tokens=tokens, examples=examples)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The micro-batch's share of the step's loss (:func:`seqcpo.losses.step_loss`).

        ``num_items_in_batch``: the step's :class:`~seqcpo.batching.StepCounts` in training; without it (evaluation,
        a direct call) the loss is this batch's own mean.
        """
        training = model.training
        examples = inputs["examples"]
        n_tokens = sum(target_tokens(e.prefix_ids, e.continuation_ids) for e in examples)
        counts, processes = num_items_in_batch, self.accelerator.num_processes
        if not isinstance(counts, StepCounts):
            counts, processes = StepCounts(tokens=n_tokens, examples=len(examples)), 1
        if self.cfg.objective == "pss":
            nll, cpo, sums = pss_terms(self, model, examples, inputs.get("epochs"), training, n_tokens)
        elif not self.cfg.uses_negatives:
            nll, cpo, sums = self._policy_logps(model, candidate_batch(examples, None), mle=True), None, {}
        elif self.cfg.task == "document":  # MLE on every row token, CPO at anchors (seqcpo.training.document_step)
            from seqcpo.training.document_step import document_terms

            nll, cpo, sums = document_terms(self, model, examples, inputs.get("epochs"), training)
            if processes == 1 and not isinstance(num_items_in_batch, StepCounts):  # this batch's own mean
                counts = StepCounts(tokens=n_tokens, examples=int(sums["loss/cpo"][1]) if "loss/cpo" in sums else 0)
        else:
            nll, cpo, sums = self._cpo_terms(model, examples, inputs, training)
        loss = step_loss(
            nll, cpo, tokens=counts.tokens, examples=counts.examples, processes=processes,
            mle_weight=self.cfg.mle_weight if cpo is not None else 1.0, cpo_lambda=self.cfg.cpo_lambda,
        )
        sums["loss/mle"] = (nll.item(), n_tokens)
        self.metrics.add("train" if training else "eval", sums)
        return (loss, {"loss": loss.detach()}) if return_outputs else loss

    def _cpo_terms(self, model, examples, inputs, training: bool):
        """Negatives and reference log-probs (:func:`score_examples`), the policy's log-probs, and the summed
        gold NLL and per-example CPO losses with their metric sums."""
        cfg = self.cfg
        epochs = inputs.get("epochs")

        def make(exs, gold_logits=None):
            return self.make_negatives(exs, training, gold_logits=gold_logits, epochs=epochs)

        scored = score_examples(
            examples, make, self.reference, source=self.mn_source, offline_rows=inputs.get("offline"), policy=model,
            policy_options=dict(pad_token_id=self.pad_token_id, chunk_size=cfg.logits_chunk_size,
                                length_normalize=cfg.normalized_logps),
        )
        out = scored.policy if scored.policy is not None else self._policy_logps(model, scored.batch)
        ref = scored.ref_logps.to(out.logps.device)
        mask = torch.tensor(scored.batch.candidate_mask, dtype=torch.bool, device=out.logps.device)
        nll = -out.summed[:, 0].float().sum()
        cpo = preference_term(cfg, out.logps, ref, mask, scored.batch, examples).sum()
        sums = preference_metric_sums(out.logps.detach(), ref, cfg.beta, mask=mask)
        sums["loss/cpo"] = (cpo.item(), len(examples))
        n_neg = mask[:, 1:].numel()
        sums["negatives/dropped"] = (float(n_neg - int(mask[:, 1:].sum())), n_neg)
        return nll, cpo, sums

    def _policy_logps(self, model, batch: CandidateBatch, mle: bool = False):
        """The policy's log-probs of ``batch``; ``mle``: the summed gold NLL of a gold-only batch."""
        layout = "shared" if mle and self.layout == "two_pass" else agreed_layout(  # a gold-only batch: one pass
            self.layout, model, batch, head_in_forward=self.head_in_forward, reduce_sum=self._reduce_sum,
            num_processes=self.accelerator.num_processes, device=self.accelerator.device,
        )
        out = sequence_logps(
            model, batch, layout=layout, pad_token_id=self.pad_token_id,
            length_normalize=False if mle else self.cfg.normalized_logps, chunk_size=self.cfg.logits_chunk_size,
            head_in_forward=self.head_in_forward,
        )
        return -out.summed[:, 0].float().sum() if mle else out

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ---- logging
    def evaluate(self, *args, **kwargs):
        self.metrics.reset("eval")  # one pool for the whole evaluation
        return super().evaluate(*args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the pooled metrics (:meth:`StepMetrics.log_values`). Runs on every process (transformers logs on
        all of them): one all-reduce."""
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        self.run_loss.whole_run_loss(logs)
        logs.update(self.metrics.log_values(mode, self.args.device))
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
        store_run_loss(self)
        save_complete_checkpoint(self, super()._save_checkpoint, model, trial)

    def train(self, *args, **kwargs):
        out = super().train(*args, **kwargs)
        loss = (out.metrics or {}).get("train_loss", out.training_loss)  # the whole run's (whole_run_loss)
        return out._replace(training_loss=loss)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            from seqcpo.training.config import save_config
            from seqcpo.training.model_card import write_model_card

            write_model_card(output_dir, self.cfg)
            save_config(self.cfg, os.path.join(output_dir, "seqcpo_config.yaml"))
