"""One config type for every run: :class:`SeqCPOConfig`, read from YAML plus ``--key value`` overrides.

It extends ``transformers.TrainingArguments`` (so every Trainer option works: ``learning_rate``,
``per_device_train_batch_size``, ``report_to``, ``gradient_checkpointing``, ...) and
:class:`seqcpo.data.DataConfig` (where examples come from), and adds the model, objective, negative and
reference options of docs/method.md. Named ``SeqCPOConfig``, not ``CPOConfig``: TRL's ``CPOConfig`` is a
different method (Contrastive Preference Optimization of Xu et al. 2024, for human-labelled pairs).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml
from transformers import TrainingArguments

from seqcpo.config_loader import ConfigError, check_fields, check_output_dir, load_dataclass, parse_cli_overrides
from seqcpo.data.config import DataConfig
from seqcpo.negatives.registry import OPTIONS as NEGATIVE_OPTIONS
from seqcpo.negatives.registry import parse_spec, resolve_an_backend
from seqcpo.training.args_checks import (
    MOVED_FIELDS_BY_NAME,
    TRACKERS,
    TRAINING_ARGS_CHECKS,
    integration_error,
    missing_trackers,
)

OBJECTIVES = ("mle", "cpo", "cpo_ranked", "dpo", "pss", "lipo", "bt_pairs", "infonca", "nca")
#: the objectives with a preference term over gold + K negatives (seqcpo.losses.preference_loss_per_example)
PREFERENCE_OBJECTIVES = ("cpo", "cpo_ranked", "dpo", "lipo", "bt_pairs", "infonca", "nca")
#: the objectives that read the negatives' column order as a ranking (negatives sorted best first)
RANKED_OBJECTIVES = ("cpo_ranked", "lipo", "bt_pairs")
REFERENCES = ("auto", "frozen_copy", "precomputed", "adapter_disabled", "none")
NEGATIVE_MODELS = ("reference", "policy")

def _is_secret(name: str) -> bool:
    """Fields never written to a config dump or report (secrets come from the environment only)."""
    from seqcpo.io import is_secret_name

    return is_secret_name(name)


QUALITY_SPLITS = ("validation", "test")

def negative_option(key: str):
    """The config field of negatives option ``key``: default, help and range from its one declaration
    (:data:`seqcpo.negatives.registry.OPTIONS`)."""
    opt = NEGATIVE_OPTIONS[key]
    meta = {"help": opt.help, "negative_option": key}
    if opt.check:
        meta["check"] = opt.check
    return field(default=opt.default, metadata=meta)


@dataclass
class SeqCPOConfig(TrainingArguments, DataConfig):
    EXTRA_CHECKS = TRAINING_ARGS_CHECKS  # ranges of inherited fields, checked like the "check" metadata
    MOVED_FIELDS = MOVED_FIELDS_BY_NAME

    # ---- model
    model_name_or_path: str = field(
        default="smollm2-135m",
        metadata={"help": 'Hugging Face Hub id, local folder (safetensors), or the embedded default "smollm2-135m".'},
    )
    model_dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32, bfloat16, float16 or auto."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run model code from the Hub; off unless you ask."})
    attn_implementation: Optional[str] = field(
        default=None, metadata={"help": "Attention kernel: sdpa (default), eager, flex_attention (CUDA)."}
    )
    lora: bool = field(default=False, metadata={"help": "Train a LoRA adapter (peft) instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank.", "check": ">=1"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha.", "check": ">0"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout.", "check": "[0,1)"})
    lora_target_modules: str = field(
        default="auto", metadata={"help": 'Comma-separated module names, or "auto" for the attention projections.'}
    )

    # ---- objective (docs/method.md, "The objective")
    objective: str = field(
        default="cpo",
        metadata={"help": "mle | cpo (softmax over K+1) | cpo_ranked (Plackett-Luce) | dpo (K = 1) | pss | lipo "
                  "(LiPO-lambda, listwise) | bt_pairs (Bradley-Terry over all ordered pairs) | infonca | nca (scored "
                  "lists: targets from the data's scores). The list losses read ties from preference data's scores; "
                  "see seqcpo.losses."},
    )
    target_margin: float = field(
        default=0.0,
        metadata={"help": "Target margin gamma taken off the gold's reward, s_0 - gamma (SimPO's form; with "
                  "reference none and K = 1 the loss is SimPO's).", "check": ">=0"},
    )
    infonca_alpha: float = field(
        default=1.0,
        metadata={"help": "infonca / nca: temperature alpha of the target distribution softmax(scores / alpha).",
                  "check": ">0"},
    )
    beta: float = field(
        default=0.1, metadata={"help": "Reward scale beta in s_i = beta*(logp_policy - logp_ref).", "check": ">0"}
    )
    cpo_lambda: float = field(
        default=1.0, metadata={"help": "Weight lambda of the CPO term: L = L_mle + lambda*L_cpo.", "check": ">=0"}
    )
    mle_weight: float = field(
        default=1.0, metadata={"help": "Weight of the MLE term (1 in the paper; 0 = CPO alone).", "check": ">=0"}
    )
    length_normalize: bool = field(
        default=False, metadata={"help": "Use token-mean instead of summed continuation log-probs in the CPO term."}
    )
    num_negatives: int = field(default=4, metadata={"help": "K, negatives per example (dpo forces 1).", "check": ">=1"})

    # ---- negatives (docs/method.md, "Negatives")
    negatives: str = field(
        default="tn:2,bn:2",
        metadata={
            "help": 'Generators: "tn", "bn", "mn", "an", or a mixture such as "an:2,tn:2" (counts sum to K; '
            "listed best first for the ranked objective)."
        },
    )
    negatives_path: Optional[str] = field(
        default=None,
        metadata={"help": "Folder written by `seqcpo negatives`: fixed negatives (and reference log-probs). Task "
                  "document: one row per anchor window, the anchors fixed at their epoch-0 draw."},
    )
    negatives_model: str = field(
        default="reference", metadata={"help": "Which model makes AN/MN negatives during training: reference | policy."}
    )
    negatives_refresh_steps: int = field(
        default=1,
        metadata={
            "check": ">=1",
            "help": "With negatives_model=policy: refresh the generating snapshot of the policy every N steps "
            "(a resumed run takes its first snapshot at the resume step: resume at a multiple of N to match)."
        },
    )
    # the generators' own options: declared once in seqcpo.negatives.registry.OPTIONS (default, help, range)
    neg_max_tries: int = negative_option("max_tries")
    tn_min_keep: int = negative_option("tn_min_keep")
    mn_c: float = negative_option("mn_c")
    mn_sample: bool = negative_option("mn_sample")
    mn_temperature: float = negative_option("mn_temperature")
    mn_c_range: list[float] = negative_option("mn_c_range")
    an_strategy: str = negative_option("an_strategy")
    an_temperature: float = negative_option("an_temperature")
    an_top_k: int = negative_option("an_top_k")
    an_top_p: float = negative_option("an_top_p")
    an_num_beams: int = negative_option("an_num_beams")
    an_max_new_tokens: int = negative_option("an_max_new_tokens")
    an_backend: str = negative_option("an_backend")
    an_vllm_model: Optional[str] = negative_option("an_vllm_model")
    an_vllm_gpu_memory_utilization: float = negative_option("an_vllm_gpu_memory_utilization")
    an_vllm_dtype: str = negative_option("an_vllm_dtype")
    an_batch_size: int = negative_option("an_batch_size")
    an_rank_by: str = negative_option("an_rank_by")
    an_temperatures: Optional[list[float]] = negative_option("an_temperatures")

    # ---- reference (docs/method.md: the frozen starting model)
    reference: str = field(
        default="auto",
        metadata={"help": "auto | frozen_copy | precomputed | adapter_disabled | none. none: reference-free (SimPO's "
                  "form): rewards are beta times the length-normalised policy log-probs, with target_margin; no "
                  "reference forward and no reference weights in memory (AN/MN negatives then come from the policy)."},
    )
    reference_dtype: Optional[str] = field(
        default=None,
        metadata={
            "help": "frozen_copy: keep the reference in this dtype (bfloat16 halves its memory and time; its "
            "log-probs are then approximate). None: the policy's dtype."
        },
    )

    # ---- the gold's own likelihood (seqcpo.training.gold_watch)
    gold_logp_window: int = field(
        default=5, metadata={"help": "Logged steps averaged for the gold log-prob warning (start and latest).",
                             "check": ">=1"},
    )
    gold_logp_max_drop: float = field(
        default=5.0,
        metadata={"help": "Warn once when the mean logps/chosen of the latest gold_logp_window logged steps falls "
                  "more than this many nats below its start (logps/chosen_delta is logged).", "check": ">0"},
    )

    # ---- PSS baseline (docs/method.md, "Baselines")
    pss_p_gold: float = field(
        default=0.5, metadata={"help": "PSS: probability of keeping each gold token.", "check": "[0,1]"}
    )
    pss_passes: int = field(default=1, metadata={"help": "PSS: number of mixing passes.", "check": ">=1"})
    pss_warmup_steps: int = field(
        default=0, metadata={"help": "PSS: steps over which mixing ramps from none to full.", "check": ">=0"}
    )

    # ---- speed
    logps_layout: str = field(
        default="auto",
        metadata={
            "help": "auto | shared | packed | two_pass | naive (all give the same numbers). shared: one "
            "prefix-shared row per example (FlexAttention on CUDA). packed: those rows end to end in one sequence, "
            "no padding (mixed lengths; auto packs when padding would add >= 10% of the tokens). two_pass: the gold "
            "branch with a KV cache, then each negative from its first token that differs from the gold, on the cached prefix (truncation negatives cost "
            "~nothing; MN negatives are drawn from the gold pass, so they cost no extra forward). auto: per batch, "
            "two_pass where it runs >= 15% fewer tokens, else shared; two_pass for the model that makes MN "
            "negatives. naive: K+1 rows per example (the reference implementation)."
        },
    )
    logits_chunk_size: int = field(
        default=1024, metadata={"help": "Tokens per chunk of the LM head + log-softmax.", "check": ">=1"}
    )

    # ---- generation quality while training (seqcpo.training.quality)
    quality_examples: int = field(
        default=32,
        metadata={
            "help": "With eval_steps set: every eval_steps the policy continues the first N prefixes of quality_split "
            "(greedy) and quality/* metrics (ROUGE-L, MiniLM similarity, repetition, distinct-2; MAUVE from 100 "
            "items) are logged; 0 turns it off.",
            "check": ">=0",
        },
    )
    quality_split: str = field(
        default="validation", metadata={"help": "Held-out split the quality slice is taken from: validation | test."}
    )
    quality_embeddings: bool = field(
        default=True, metadata={"help": "Add the MiniLM embedding similarity (and MAUVE) to the quality metrics."}
    )
    quality_samples: int = field(
        default=3,
        metadata={"help": "Continuations written beside their gold to quality_samples.jsonl per evaluation.",
                  "check": ">=0"},
    )

    # ---- resume (seqcpo.training.checkpoints)
    allow_config_change: bool = field(
        default=False,
        metadata={
            "help": "Resume even from a checkpoint written under other decisive settings (learning rate, data, "
            "objective, seed, ...); the differences are logged. Off: such a resume is refused, naming them."
        },
    )

    def __post_init__(self):
        if self.output_dir is None:
            self.output_dir = "runs/seqcpo"
        # A custom collator passes python lists through; the Trainer must not drop our columns.
        self.remove_unused_columns = False
        # non-reentrant checkpointing needs no input gradients, so it also works under LoRA; newer transformers
        # call the option activation_checkpointing(_kwargs) and keep gradient_checkpointing(_kwargs) as aliases
        kw = "activation_checkpointing_kwargs" if hasattr(self, "activation_checkpointing_kwargs") else "gradient_checkpointing_kwargs"
        on = self.gradient_checkpointing or getattr(self, "activation_checkpointing", None)
        if on and getattr(self, kw) is None and self.gradient_checkpointing_kwargs is None:
            setattr(self, kw, {"use_reentrant": False})
        DataConfig.__post_init__(self)
        TrainingArguments.__post_init__(self)
        self.validate()

    def validate(self) -> None:
        def bad(name, msg):
            value = getattr(self, name)
            value = getattr(value, "value", value)  # enums (eval_strategy, ...) by their plain value
            raise ConfigError(f"{name}={value!r}: {msg}")

        check_fields(self)  # floats finite, the declared ranges (num_negatives >= 1, beta > 0, ...)
        check_output_dir(self.output_dir, "output_dir")
        why = integration_error(self.report_to)
        if why:
            raise ConfigError(why)
        for tracker in missing_trackers(self.report_to):
            module, extra = TRACKERS[tracker]
            raise ConfigError(f"report_to={tracker!r}: the {module} package is not installed; install the extra: "
                              f"pip install 'seqcpo[{extra}]' (or pip install {module}), or choose another report_to")
        if self.objective not in OBJECTIVES:
            bad("objective", f"choose one of {', '.join(OBJECTIVES)}")
        if self.reference_dtype not in (None, "float32", "bfloat16", "float16"):
            bad("reference_dtype", "choose float32, bfloat16 or float16 (or leave it unset)")
        if self.reference not in REFERENCES:
            bad("reference", f"choose one of {', '.join(REFERENCES)}")
        if self.quality_split not in QUALITY_SPLITS:
            bad("quality_split", f"choose one of {', '.join(QUALITY_SPLITS)}")
        if self.negatives_model not in NEGATIVE_MODELS:
            bad("negatives_model", f"choose one of {', '.join(NEGATIVE_MODELS)}")
        if self.objective == "dpo" and self.num_negatives != 1:
            # DPO is CPO with one negative (docs/method.md); say so rather than silently changing K
            bad("num_negatives", "objective dpo uses exactly one negative: set num_negatives: 1")
        if self.logps_layout not in ("auto", "shared", "packed", "two_pass", "naive"):
            bad("logps_layout", "choose auto, shared, packed, two_pass or naive")
        for f in dataclasses.fields(self):
            key = f.metadata.get("negative_option")
            choices = NEGATIVE_OPTIONS[key].choices if key else None
            if choices is not None and getattr(self, f.name) not in choices:
                bad(f.name, f"choose one of {', '.join(choices)}")
        low_high = list(self.mn_c_range)
        if len(low_high) != 2 or not 0.0 <= low_high[0] <= low_high[1] <= 1.0:
            bad("mn_c_range", "give two numbers low,high with 0 <= low <= high <= 1")
        if self.an_temperatures is not None and not all(math.isfinite(t) and t > 0 for t in self.an_temperatures):
            bad("an_temperatures", "every temperature must be a finite number > 0")
        if self.an_backend == "vllm" and self.negatives_model == "policy":
            bad("an_backend", "vLLM holds its own copy of the starting weights and cannot follow the policy: "
                "use negatives_model reference, or an_backend shared_prefill")
        if self.uses_negatives:
            try:
                parts = dict(self.negatives_parts)
            except ValueError as e:
                raise ConfigError(f"negatives={self.negatives!r}: {e}") from None
            bn = parts.get("bn", 0)
            if "data" in parts and self.task in ("instruction", "document"):
                bad("negatives", f"'data' negatives are a preference row's rejected answers and task {self.task} has "
                    "none: train on preference data (task: preference), or choose tn, bn, an or mn")
            if "an" in parts:
                self._validate_an(bad, parts["an"])
            if self.task == "document":
                self._validate_document(bad, bn)
            elif bn and not self.negatives_path and self.per_device_train_batch_size < bn + 1:
                bad(
                    "per_device_train_batch_size",
                    f"{bn} batch negatives (bn) per example need at least {bn + 1} examples per device batch",
                )
        if self.uses_negatives and self.negatives_path and self.eval_strategy != "no":
            bad(
                "eval_strategy",
                "fixed negatives (negatives_path) cover the training split only; evaluate with `seqcpo eval` "
                "after training, or drop negatives_path to make validation negatives during training",
            )
        if self.uses_negatives and self.reference == "precomputed" and not self.negatives_path:
            bad(
                "reference",
                "'precomputed' needs fixed negatives with reference log-probs: make them with `seqcpo negatives` "
                "and set negatives_path, or use reference frozen_copy",
            )

    def _validate_an(self, bad, count: int) -> None:
        """The AN decoding against its ``count`` negatives, in the config's field names (the generator checks
        the same in DecodingConfig's names, but only once the model and the data have loaded)."""
        if self.an_strategy == "greedy" and count > 1:
            bad("an_strategy", f"greedy decoding gives one continuation per prefix, not {count} AN negatives: "
                f"use sample, or beam with an_num_beams >= {count}")
        if self.an_strategy == "beam" and self.an_num_beams < max(2, count):
            greedy = ", or an_strategy greedy for one beam" if count == 1 else ""
            bad("an_num_beams", f"beam search needs at least 2 beams and one per AN negative ({count}): set "
                f"an_num_beams >= {max(2, count)}{greedy}")
        if self.an_temperatures is not None:
            if self.an_strategy != "sample":
                bad("an_temperatures", f"sampling temperatures need an_strategy sample, not {self.an_strategy}")
            if len(self.an_temperatures) != count:
                bad("an_temperatures", f"has {len(self.an_temperatures)} values for the {count} AN negatives of "
                    f"negatives={self.negatives!r}; give one per AN negative")
        if self.an_rank_by == "temperature" and self.an_temperatures is None:
            bad("an_rank_by", f"ranking by temperature needs an_temperatures, one per AN negative ({count})")

    def _validate_document(self, bad, bn: int) -> None:
        """Document rows with negatives: made during training at anchors drawn per (row, epoch) and scored live,
        or fixed (``negatives_path``: anchors fixed at their epoch-0 draw, negatives and reference log-probs read
        by window id). BN's pool is the batch's other anchors, when ``seqcpo negatives`` makes them too (it runs
        without negatives_path): a training run on a folder makes none."""
        per_row = self.anchors_per_row if self.anchor_stride is None else None
        # anchors sit at stride, 2*stride, ... <= n - continuation_tokens, and no row is longer than max_length
        most = self.max_length - self.continuation_tokens
        if self.anchor_stride is not None and self.anchor_stride > most:
            bad("anchor_stride", f"no row gets an anchor (so no CPO term): the largest stride that gives one is "
                f"max_length - continuation_tokens = {most} (or objective mle)")
        if per_row == 0:
            bad("anchors_per_row", "task document with a CPO objective needs at least one anchor per row "
                "(or objective mle)")
        pool = None if per_row is None or self.negatives_path else per_row * self.per_device_train_batch_size
        if bn and pool is not None and pool < bn + 1:
            bad("anchors_per_row", f"{bn} batch negatives (bn) per anchor need at least {bn + 1} anchors per device "
                "batch (anchors_per_row x per_device_train_batch_size): the other anchors' golds are BN's pool")

    @property
    def uses_negatives(self) -> bool:
        return self.objective in PREFERENCE_OBJECTIVES

    @property
    def negatives_parts(self) -> list[tuple[str, int]]:
        """``negatives`` parsed (:func:`seqcpo.negatives.registry.parse_spec`), once per (spec, K): the
        ``[(generator, count), ...]`` every builder of the generators takes."""
        key = (self.negatives, self.num_negatives)
        cached = self.__dict__.get("_negatives_parts")
        if cached is None or cached[0] != key:
            cached = (key, parse_spec(*key))
            self.__dict__["_negatives_parts"] = cached
        return list(cached[1])

    @property
    def ranked(self) -> bool:
        return self.objective in RANKED_OBJECTIVES

    @property
    def normalized_logps(self) -> bool:
        """Whether the preference term reads length-normalised log-probs (``length_normalize``, or always
        reference-free)."""
        return bool(self.length_normalize or self.reference == "none")

    def data_config(self) -> DataConfig:
        return DataConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(DataConfig)})

    def resolved_an_backend(self, offline: bool = False) -> str:
        """``an_backend`` with "auto" resolved: vLLM for `seqcpo negatives` (``offline``) when it and CUDA are
        present, else shared_prefill."""
        return resolve_an_backend(self.an_backend, offline, reference_made=self.negatives_model == "reference")

    def negative_options(self, offline: bool = False) -> dict[str, Any]:
        """Options for :func:`seqcpo.negatives.build_negative_generator` (``offline``: for `seqcpo negatives`):
        every option of :data:`seqcpo.negatives.registry.OPTIONS` that is set, the vLLM ones with vLLM only."""
        backend = self.resolved_an_backend(offline)
        opts: dict[str, Any] = {}
        for key, opt in NEGATIVE_OPTIONS.items():
            value = getattr(self, opt.config_name or key)
            if value is None or (opt.vllm_only and backend != "vllm"):
                continue
            opts[key] = value
        opts["an_backend"] = backend
        opts["mn_c_range"] = tuple(float(x) for x in self.mn_c_range)
        if "an_temperatures" in opts:
            opts["an_temperatures"] = [float(x) for x in opts["an_temperatures"]]
        return opts

    def to_public_dict(self) -> dict[str, Any]:
        """Every field, minus secrets, as plain YAML-able values (the resolved config saved with a run)."""
        out = {}
        for f in dataclasses.fields(self):
            if _is_secret(f.name):
                continue
            v = getattr(self, f.name)
            if hasattr(v, "value"):  # enums
                v = v.value
            if isinstance(v, (str, int, float, bool)) or v is None:
                out[f.name] = v
            elif isinstance(v, (list, tuple)):
                out[f.name] = [x.value if hasattr(x, "value") else x for x in v]
            elif isinstance(v, dict) or (dataclasses.is_dataclass(v) and not isinstance(v, type)):
                # a nested dataclass (accelerator_config) as its fields, so the saved config loads again
                v = v if isinstance(v, dict) else dataclasses.asdict(v)
                out[f.name] = {k: x for k, x in v.items() if not _is_secret(k)}
            else:
                out[f.name] = str(v)
        return out

    def __repr__(self) -> str:
        # the generated dataclass repr would print hub_token; TrainingArguments' masks every *_token field
        return TrainingArguments.__str__(self)

    def __getstate__(self) -> dict[str, Any]:
        """Pickles (``training_args.bin`` in every checkpoint, copies) leave secrets out: a token is read from
        the environment or the command line and lives in this process only."""
        state = dict(self.__dict__)
        for name in state:
            if _is_secret(name) and state[name] is not None:
                state[name] = None
        return state


# `--key value` of the command line; values stay strings until the field's type reads them.
parse_overrides = parse_cli_overrides


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None,
                where: str = "command line") -> SeqCPOConfig:
    """Read a YAML file, apply overrides (from ``where``), check every key, type and range, build the config.

    One loader for every command (:func:`seqcpo.config_loader.load_dataclass`): unknown keys and wrong
    types fail with the file and field named (and a close match suggested).
    """
    if overrides and overrides.get("output_dir") is not None:  # named by its origin, not blamed on the YAML file
        check_output_dir(str(overrides["output_dir"]), "--output_dir" if where == "command line" else f"{where}: output_dir")
    return load_dataclass(SeqCPOConfig, path, overrides, where=where)


def save_config(cfg: SeqCPOConfig, path: str | os.PathLike) -> None:
    """Write the resolved config (no secrets) as YAML, atomically."""
    from seqcpo.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_public_dict(), sort_keys=True))
