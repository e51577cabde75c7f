"""A thin ``transformers.Trainer`` that composes the core: negatives -> log-probs -> loss.

Per training step (PAPER.md, "The objective"):

1. the batch's gold examples get K negatives: read from a fixed offline set (``negatives_path``) or made now
   by the configured generators, seeded by (seed, step, micro-step, process) so a resumed run makes the
   same negatives as an uninterrupted one;
2. the policy scores gold + negatives (:mod:`seqcpo.logps`): in the prefix-shared layout, or in two passes
   (:mod:`seqcpo.two_pass`) when its negatives share long beginnings with the gold; ``logps_layout: auto``
   chooses per batch (:func:`seqcpo.logps.choose_layout`);
3. the reference scores them too (frozen copy, adapter disabled, or precomputed log-probs);
4. ``L = mle_weight * L_mle(gold) + lambda * L_cpo`` (or MLE / DPO / PSS alone), with the metrics of
   :func:`seqcpo.losses.preference_metrics` logged beside it.

With MN negatives and ``logps_layout: auto`` (the default), the model that makes them is scored in two passes:
its gold-branch pass gives both its gold log-probs and the logits MN draws from, so MN costs no forward pass of
its own. That model is the live reference by default, or the policy with ``negatives_model: policy`` (and
``negatives_refresh_steps: 1``).

Logged metrics: ``loss``, ``loss/mle``, ``loss/cpo``, ``rewards/chosen``, ``rewards/rejected``,
``rewards/margins``, ``rewards/accuracies``, ``rewards/strongest_rejected``, ``rewards/gold_top1``,
``logps/chosen``, ``logps/rejected``, ``negatives/dropped`` (fraction of negatives masked because they equalled
the gold), and for PSS ``pss/mix_fraction``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
from collections import defaultdict
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import Trainer

from seqcpo.logps import sequence_logps, unwrap_model
from seqcpo.losses import cpo_loss, mle_loss, preference_metrics
from seqcpo.negatives import build_negative_generator, uses_gold_logits
from seqcpo.reference import AdapterDisabledReference, FrozenCopyReference, build_reference
from seqcpo.two_pass import gold_pass, negatives_pass, two_pass_supported
from seqcpo.training.checkpoints import NonFiniteGuard, finite_logs, save_complete_checkpoint
from seqcpo.training.config import SeqCPOConfig
from seqcpo.types import CandidateBatch, Example, Negatives


class ExampleDataset(Dataset):
    """Examples as dicts the collator understands; attaches fixed negatives by example id when given."""

    def __init__(self, examples: list[Example], offline: dict[str, dict] | None = None):
        self.examples = examples
        self.offline = offline
        if offline is not None:
            missing = [str(ex.meta.get("id")) for ex in examples if str(ex.meta.get("id")) not in offline]
            if missing:
                raise ValueError(
                    f"negatives_path has no negatives for {len(missing)} training examples (first: id {missing[0]}); "
                    "re-run `seqcpo negatives` with the same data settings"
                )

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ex = self.examples[i]
        item = {"prefix_ids": ex.prefix_ids, "continuation_ids": ex.continuation_ids, "id": str(ex.meta.get("id", i))}
        if self.offline is not None:
            item["offline"] = self.offline[item["id"]]
        return item


def collate_examples(features: list[dict[str, Any]]) -> dict[str, Any]:
    """Lists of examples -> one batch dict of python lists (token ids stay lists until the layout is built).

    >>> collate_examples([{"prefix_ids": [1, 2], "continuation_ids": [3], "id": "a"}])
    {'prefix_ids': [[1, 2]], 'continuation_ids': [[3]], 'ids': ['a'], 'offline': None}
    """
    return {
        "prefix_ids": [f["prefix_ids"] for f in features],
        "continuation_ids": [f["continuation_ids"] for f in features],
        "ids": [f["id"] for f in features],
        "offline": [f["offline"] for f in features] if "offline" in features[0] else None,
    }


def _negatives_from_offline(rows: list[dict]) -> tuple[Negatives, torch.Tensor | None]:
    neg = Negatives(
        ids=[r["negatives"] for r in rows],
        valid=[r["valid"] for r in rows],
        scores=[r["scores"] for r in rows] if rows[0].get("scores") is not None else None,
        sources=[r["sources"] for r in rows],
    )
    ref = None
    if rows[0].get("ref_logps") is not None:
        ref = torch.tensor([r["ref_logps"] for r in rows], dtype=torch.float32)
    return neg, ref


def candidate_batch(examples: list[Example], negatives: Negatives | None, ref_logps=None) -> CandidateBatch:
    """Gold + negatives -> :class:`CandidateBatch` (column 0 the gold)."""
    if negatives is None:
        return CandidateBatch(
            prefix_ids=[e.prefix_ids for e in examples],
            candidate_ids=[[e.continuation_ids] for e in examples],
            candidate_mask=[[True] for _ in examples],
        )
    return CandidateBatch(
        prefix_ids=[e.prefix_ids for e in examples],
        candidate_ids=[[e.continuation_ids] + list(n) for e, n in zip(examples, negatives.ids)],
        candidate_mask=[[True] + list(v) for v in negatives.valid],
        ref_logps=ref_logps,
    )


def step_seed(seed: int, step: int, micro: int, process: int) -> int:
    """A seed for one micro-batch's negatives that a resumed run reproduces exactly."""
    digest = hashlib.sha256(f"{seed}/{step}/{micro}/{process}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


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
        self.loss_is_scaled_for_ga = False  # our loss is a per-micro-batch mean
        self.cfg = args
        tok = self.processing_class
        self.pad_token_id = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
        self.eos_token_id = tok.eos_token_id if tok is not None else unwrap_model(model).config.eos_token_id
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        # per mode: (step last seen, micro-batches drawn at it); eval never shifts the training seeds
        self._rng_state = {True: [-1, 0], False: [-1, 0]}
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
            # the adapter-off policy is the starting model (PAPER.md: negatives from the reference)
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

    def _rng(self, training: bool) -> torch.Generator:
        """Seeded by (seed, step, micro-batch, process) in training; in evaluation by (seed, batch, process)
        only, so every evaluation scores the same negatives and model changes are not mixed with resampling."""
        state = self._rng_state[training]
        step = self.state.global_step if training else 0
        if step != state[0]:
            state[0], state[1] = step, 0
        seed = step_seed(self.cfg.seed + (0 if training else 7919), step, state[1], self.args.process_index)
        state[1] += 1
        return torch.Generator().manual_seed(seed)

    def evaluate(self, *args, **kwargs):
        self._rng_state[False] = [-1, 0]  # the same validation negatives at every evaluation
        return super().evaluate(*args, **kwargs)

    def make_negatives(self, examples: list[Example], training: bool = True, gold_logits=None) -> Negatives:
        extra = {"gold_logits": gold_logits} if gold_logits is not None else {}
        return self.generator(examples, self.cfg.num_negatives, self._rng(training), ranked=self.cfg.ranked, **extra)

    # ---- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        examples = [
            Example(prefix_ids=p, continuation_ids=c, meta={"id": i})
            for p, c, i in zip(inputs["prefix_ids"], inputs["continuation_ids"], inputs["ids"])
        ]
        cfg = self.cfg
        metrics: dict[str, float] = {}
        if cfg.objective == "pss":
            from seqcpo.pss import pss_loss, pss_mix_probability

            p_model = pss_mix_probability(self.state.global_step, cfg.pss_p_gold, cfg.pss_warmup_steps)
            loss, frac = pss_loss(
                model, examples, p_model=p_model, passes=cfg.pss_passes, generator=self._rng(mode == "train"),
                pad_token_id=self.pad_token_id,
            )
            metrics["loss/mle"] = loss.item()
            metrics["pss/mix_fraction"] = frac
        elif not cfg.uses_negatives:
            out = sequence_logps(
                model, candidate_batch(examples, None), layout="naive" if self.layout == "naive" else "shared",
                pad_token_id=self.pad_token_id,
                chunk_size=cfg.logits_chunk_size, head_in_forward=self.head_in_forward,
            )
            loss = mle_loss(out.summed[:, 0], out.token_counts[:, 0])
            metrics["loss/mle"] = loss.item()
        else:
            batch, out, ref = self._score(model, inputs, examples, training=mode == "train")
            ref = ref.to(out.logps.device)
            mask = torch.tensor(batch.candidate_mask, dtype=torch.bool, device=out.logps.device)
            mle = mle_loss(out.summed[:, 0], out.token_counts[:, 0])
            cpo = cpo_loss(out.logps, ref, cfg.beta, ranked=cfg.ranked, mask=mask)
            loss = cfg.mle_weight * mle + cfg.cpo_lambda * cpo
            metrics.update(preference_metrics(out.logps.detach(), ref, cfg.beta, mask=mask))
            metrics["loss/mle"] = mle.item()
            metrics["loss/cpo"] = cpo.item()
            metrics["negatives/dropped"] = 1.0 - mask[:, 1:].float().mean().item()
        for k, v in metrics.items():
            self._metrics[mode][k].append(v)
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
        if self.mn_source == "reference":
            # one reference pass over x + y_0 gives the reference's gold log-probs and MN's logits
            rgp = self.reference.gold_pass(prefixes, golds, want_logits=True)
            negatives = self.make_negatives(examples, training, gold_logits=rgp.gold_logits)
            batch = candidate_batch(examples, negatives)
            return batch, self._policy_logps(model, batch), self.reference.finish(rgp, negatives.ids)
        if self.mn_source == "policy":
            # the policy's own gold-branch pass (with gradient) gives its gold log-probs and MN's logits
            gp = gold_pass(model, prefixes, golds, want_logits=True, **opts)
            negatives = self.make_negatives(examples, training, gold_logits=gp.gold_logits)
            out = negatives_pass(model, gp, negatives.ids, length_normalize=cfg.length_normalize, **opts)
            batch = candidate_batch(examples, negatives)
            return batch, out, self.reference.logps(batch)
        batch = candidate_batch(examples, self.make_negatives(examples, training))
        return batch, self._policy_logps(model, batch), self.reference.logps(batch)

    def _policy_logps(self, model, batch: CandidateBatch):
        cfg = self.cfg
        return sequence_logps(
            model, batch, layout=self.layout, pad_token_id=self.pad_token_id, length_normalize=cfg.length_normalize,
            chunk_size=cfg.logits_chunk_size, head_in_forward=self.head_in_forward,
        )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        stored = self._metrics[mode]
        if stored:
            gathered = {}
            for k, vals in stored.items():
                t = torch.tensor(vals, dtype=torch.float64, device=self.args.device).mean()
                gathered[k] = self.accelerator.gather_for_metrics(t.reshape(1)).mean().item()
            prefix = "eval_" if mode == "eval" else ""
            logs.update({f"{prefix}{k}": round(v, 6) for k, v in gathered.items()})
            stored.clear()
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
