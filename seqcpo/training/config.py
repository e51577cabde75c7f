"""One config type for every run: :class:`SeqCPOConfig`, read from YAML plus ``--key value`` overrides.

It extends ``transformers.TrainingArguments`` (so every Trainer option works: ``learning_rate``,
``per_device_train_batch_size``, ``report_to``, ``gradient_checkpointing``, ...) and
:class:`seqcpo.data.DataConfig` (where examples come from), and adds the model, objective, negative and
reference options of PAPER.md. Named ``SeqCPOConfig``, not ``CPOConfig``: TRL's ``CPOConfig`` is a
different method (Contrastive Preference Optimization of Xu et al. 2024, for human-labelled pairs).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml
from transformers import TrainingArguments

from seqcpo.data.config import DataConfig

OBJECTIVES = ("mle", "cpo", "cpo_ranked", "dpo", "pss")
REFERENCES = ("auto", "frozen_copy", "precomputed", "adapter_disabled")
NEGATIVE_MODELS = ("reference", "policy")

# Fields never written to a config dump or report (secrets come from the environment only): names ending in
# "_token" (hub_token, ...; not the "_tokens" counts) or holding one of these words.
_SECRET_WORDS = ("api_key", "password", "secret")


def _is_secret(name: str) -> bool:
    name = str(name).lower()
    return name.endswith("_token") or name == "token" or any(w in name for w in _SECRET_WORDS)


class ConfigError(ValueError):
    """A bad config value; the message names the file and the field."""


@dataclass
class SeqCPOConfig(TrainingArguments, DataConfig):
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
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(
        default="auto", metadata={"help": 'Comma-separated module names, or "auto" for the attention projections.'}
    )

    # ---- objective (PAPER.md, "The objective")
    objective: str = field(
        default="cpo",
        metadata={"help": "mle | cpo (softmax over K+1) | cpo_ranked (Plackett-Luce) | dpo (K = 1) | pss."},
    )
    beta: float = field(default=0.1, metadata={"help": "Reward scale beta in s_i = beta*(logp_policy - logp_ref)."})
    cpo_lambda: float = field(default=1.0, metadata={"help": "Weight lambda of the CPO term: L = L_mle + lambda*L_cpo."})
    mle_weight: float = field(default=1.0, metadata={"help": "Weight of the MLE term (1 in the paper; 0 = CPO alone)."})
    length_normalize: bool = field(
        default=False, metadata={"help": "Use token-mean instead of summed continuation log-probs in the CPO term."}
    )
    num_negatives: int = field(default=4, metadata={"help": "K, negatives per example (dpo forces 1)."})

    # ---- negatives (PAPER.md, "Negatives")
    negatives: str = field(
        default="tn:2,bn:2",
        metadata={
            "help": 'Generators: "tn", "bn", "mn", "an", or a mixture such as "an:2,tn:2" (counts sum to K; '
            "listed best first for the ranked objective)."
        },
    )
    negatives_path: Optional[str] = field(
        default=None, metadata={"help": "Folder written by `seqcpo negatives`: fixed negatives (and reference log-probs)."}
    )
    negatives_model: str = field(
        default="reference", metadata={"help": "Which model makes AN/MN negatives during training: reference | policy."}
    )
    negatives_refresh_steps: int = field(
        default=1,
        metadata={
            "help": "With negatives_model=policy: refresh the generating snapshot of the policy every N steps "
            "(a resumed run takes its first snapshot at the resume step: resume at a multiple of N to match)."
        },
    )
    neg_max_tries: int = field(default=8, metadata={"help": "Resamples of a negative identical to the gold before dropping it."})
    tn_min_keep: int = field(default=1, metadata={"help": "TN: fewest gold tokens kept before the EOS."})
    mn_c: float = field(default=0.15, metadata={"help": "MN: fraction c of continuation positions replaced."})
    mn_sample: bool = field(default=True, metadata={"help": "MN: sample the replacement (else argmax)."})
    mn_temperature: float = field(default=1.0, metadata={"help": "MN: sampling temperature."})
    mn_c_range: str = field(default="0.05,0.5", metadata={"help": "MN ranked: K values of c spread over this range."})
    an_strategy: str = field(default="sample", metadata={"help": "AN decoding: sample | greedy | beam."})
    an_temperature: float = field(default=1.0, metadata={"help": "AN: sampling temperature."})
    an_top_k: int = field(default=0, metadata={"help": "AN: top-k (0 = off)."})
    an_top_p: float = field(default=1.0, metadata={"help": "AN: top-p (1 = off)."})
    an_num_beams: int = field(default=4, metadata={"help": "AN: beams for beam search."})
    an_max_new_tokens: int = field(default=64, metadata={"help": "AN: longest negative in tokens."})
    an_backend: str = field(
        default="auto",
        metadata={
            "help": "AN: auto | shared_prefill | hf | vllm. shared_prefill: one cached prefill per prefix, our "
            "decoding loop; hf: model.generate; vllm: vLLM's engine over the starting model's weights (needs the "
            "vllm package and a GPU; reference-made negatives only). auto: vllm in `seqcpo negatives` when vllm "
            "and CUDA are present, shared_prefill otherwise (training opts into vllm explicitly: it shares the GPU)."
        },
    )
    an_vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "AN on vLLM: fraction of the GPU vLLM may take (leave room for training)."}
    )
    an_vllm_dtype: str = field(default="auto", metadata={"help": "AN on vLLM: auto (the checkpoint's) or a dtype name."})
    an_batch_size: int = field(default=16, metadata={"help": "AN: prefixes decoded together."})
    an_rank_by: str = field(default="rouge", metadata={"help": "AN ranked: rouge (ROUGE-L F to the gold) | temperature."})
    an_temperatures: Optional[str] = field(
        default=None, metadata={"help": "AN ranked by temperature: K comma-separated temperatures, best (lowest) first."}
    )

    # ---- reference (PAPER.md: the frozen starting model)
    reference: str = field(default="auto", metadata={"help": "auto | frozen_copy | precomputed | adapter_disabled."})
    reference_dtype: Optional[str] = field(
        default=None,
        metadata={
            "help": "frozen_copy: keep the reference in this dtype (bfloat16 halves its memory and time; its "
            "log-probs are then approximate). None: the policy's dtype."
        },
    )

    # ---- PSS baseline (PAPER.md, "Baselines")
    pss_p_gold: float = field(default=0.5, metadata={"help": "PSS: probability of keeping each gold token."})
    pss_passes: int = field(default=1, metadata={"help": "PSS: number of mixing passes."})
    pss_warmup_steps: int = field(default=0, metadata={"help": "PSS: steps over which mixing ramps from none to full."})

    # ---- speed
    logps_layout: str = field(
        default="auto",
        metadata={
            "help": "auto | shared | two_pass | naive (all give the same numbers). shared: one prefix-shared row "
            "per example (FlexAttention on CUDA). two_pass: the gold branch with a KV cache, then each negative "
            "from its first token that differs from the gold, on the cached prefix (truncation negatives cost "
            "~nothing; MN negatives are drawn from the gold pass, so they cost no extra forward). auto: per batch, "
            "two_pass where it runs >= 15% fewer tokens, else shared; two_pass for the model that makes MN "
            "negatives. naive: K+1 rows per example (the reference implementation)."
        },
    )
    logits_chunk_size: int = field(default=1024, metadata={"help": "Tokens per chunk of the LM head + log-softmax."})

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

        if self.objective not in OBJECTIVES:
            bad("objective", f"choose one of {', '.join(OBJECTIVES)}")
        if self.reference_dtype not in (None, "float32", "bfloat16", "float16"):
            bad("reference_dtype", "choose float32, bfloat16 or float16 (or leave it unset)")
        if self.reference not in REFERENCES:
            bad("reference", f"choose one of {', '.join(REFERENCES)}")
        if self.negatives_model not in NEGATIVE_MODELS:
            bad("negatives_model", f"choose one of {', '.join(NEGATIVE_MODELS)}")
        if self.beta <= 0:
            bad("beta", "must be positive")
        if self.num_negatives < 1:
            bad("num_negatives", "must be at least 1")
        if self.objective == "dpo" and self.num_negatives != 1:
            # DPO is CPO with one negative (PAPER.md); say so rather than silently changing K
            bad("num_negatives", "objective dpo uses exactly one negative: set num_negatives: 1")
        if self.logps_layout not in ("auto", "shared", "two_pass", "naive"):
            bad("logps_layout", "choose auto, shared, two_pass or naive")
        if not 0.0 <= self.pss_p_gold <= 1.0:
            bad("pss_p_gold", "must lie in [0, 1]")
        if self.pss_passes < 1:
            bad("pss_passes", "must be at least 1")
        if self.negatives_refresh_steps < 1:
            bad("negatives_refresh_steps", "must be at least 1")
        if self.an_backend not in ("auto", "shared_prefill", "hf", "vllm"):
            bad("an_backend", "choose auto, shared_prefill, hf or vllm")
        if self.an_backend == "vllm" and self.negatives_model == "policy":
            bad("an_backend", "vLLM holds its own copy of the starting weights and cannot follow the policy: "
                "use negatives_model reference, or an_backend shared_prefill")
        if self.uses_negatives:
            from seqcpo.negatives.registry import parse_spec

            try:
                parts = dict(parse_spec(self.negatives, self.num_negatives))
            except ValueError as e:
                raise ConfigError(f"negatives={self.negatives!r}: {e}") from None
            bn = parts.get("bn", 0)
            if bn and not self.negatives_path and self.per_device_train_batch_size < bn + 1:
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

    @property
    def uses_negatives(self) -> bool:
        return self.objective in ("cpo", "cpo_ranked", "dpo")

    @property
    def ranked(self) -> bool:
        return self.objective == "cpo_ranked"

    def data_config(self) -> DataConfig:
        return DataConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(DataConfig)})

    def resolved_an_backend(self, offline: bool = False) -> str:
        """``an_backend`` with "auto" resolved: vLLM for `seqcpo negatives` (``offline``) when it and CUDA are
        present, else shared_prefill."""
        if self.an_backend != "auto":
            return self.an_backend
        if offline and self.negatives_model == "reference":
            import torch

            from seqcpo.negatives.vllm_backend import vllm_available

            if vllm_available() and torch.cuda.is_available():
                return "vllm"
        return "shared_prefill"

    def negative_options(self, offline: bool = False) -> dict[str, Any]:
        """Options for :func:`seqcpo.negatives.build_negative_generator` (``offline``: for `seqcpo negatives`)."""
        opts = {
            "max_tries": self.neg_max_tries,
            "tn_min_keep": self.tn_min_keep,
            "mn_c": self.mn_c,
            "mn_sample": self.mn_sample,
            "mn_temperature": self.mn_temperature,
            "mn_c_range": tuple(float(x) for x in self.mn_c_range.split(",")),
            "an_strategy": self.an_strategy,
            "an_temperature": self.an_temperature,
            "an_top_k": self.an_top_k,
            "an_top_p": self.an_top_p,
            "an_num_beams": self.an_num_beams,
            "an_max_new_tokens": self.an_max_new_tokens,
            "an_backend": self.resolved_an_backend(offline),
            "an_rank_by": self.an_rank_by,
            "an_batch_size": self.an_batch_size,
        }
        if self.an_temperatures:
            opts["an_temperatures"] = [float(x) for x in self.an_temperatures.split(",")]
        if opts["an_backend"] == "vllm":
            opts["an_vllm_dtype"] = self.an_vllm_dtype
            opts["an_vllm_gpu_memory_utilization"] = self.an_vllm_gpu_memory_utilization
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
            elif isinstance(v, dict):
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


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(SeqCPOConfig)
    return {f.name: hints.get(f.name) for f in dataclasses.fields(SeqCPOConfig) if f.init}


def _base_type(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else None
    return tp


def _coerce(name: str, value: Any, tp, where: str) -> Any:
    base = _base_type(tp)
    if value is None:
        return None
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ValueError("expected true or false")
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and value != int(value)):
                raise ValueError("expected a whole number")
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if base is str:
            if isinstance(value, (dict, list)):
                raise ValueError("expected a string")
            return str(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: field {name!r}: {value!r} is not valid ({e})") from None
    return value


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """``["--beta", "0.2", "--lora", "--report_to", "none"]`` -> {"beta": 0.2, "lora": True, ...}.

    Values are read as YAML scalars (so ``0.2`` is a number, ``true`` a bool); a flag with no value is True.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            raise ConfigError(f"command line: expected --key value, got {tok!r}")
        key = tok[2:].replace("-", "_")
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            raw = argv[i + 1]
            i += 2
        else:
            raw = "true"
            i += 1
        try:
            out[key] = yaml.safe_load(raw)
        except yaml.YAMLError:
            out[key] = raw
        if isinstance(out[key], (dict,)) or out[key] is None and raw not in ("null", "~", "None"):
            out[key] = raw
    return out


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> SeqCPOConfig:
    """Read a YAML file, apply overrides, check every key and type, and build the config.

    Unknown keys and wrong types fail with the file and field named (and a close match suggested).
    """
    raw: dict[str, Any] = {}
    where = "config"
    if path is not None:
        where = str(path)
        if not os.path.exists(path):
            raise ConfigError(f"{path}: no such config file")
        with open(path, encoding="utf-8") as fh:
            try:
                loaded = yaml.safe_load(fh)
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                line = f" line {mark.line + 1}" if mark is not None else ""
                raise ConfigError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of field: value")
        raw.update(loaded)
    types = _field_types()
    merged = {}
    for source, items in ((where, raw), ("command line", overrides or {})):
        for key, value in items.items():
            if key not in types:
                close = difflib.get_close_matches(key, types.keys(), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{source}: unknown field {key!r}{hint}")
            merged[key] = _coerce(key, value, types[key], source)
    try:
        return SeqCPOConfig(**merged)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def save_config(cfg: SeqCPOConfig, path: str | os.PathLike) -> None:
    """Write the resolved config (no secrets) as YAML, atomically."""
    from seqcpo.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_public_dict(), sort_keys=True))


def config_reference() -> str:
    """Markdown table of every seqcpo field (data, model, objective, negatives, reference, PSS, speed).

    ``docs/CONFIG.md`` is this text; a test keeps the two in step. The ``TrainingArguments`` fields
    (learning rate, batch size, schedule, logging, checkpoints, ``report_to``) are documented by transformers.
    """
    train_names = {f.name for f in dataclasses.fields(TrainingArguments)}
    lines = [
        "# Config reference",
        "",
        "Generated from `seqcpo.training.config.SeqCPOConfig` (`python -m seqcpo.training.config > docs/CONFIG.md`).",
        "Every field can be set in the YAML file or as `--field value` on the command line. All fields of",
        "`transformers.TrainingArguments` (learning_rate, per_device_train_batch_size, max_steps, bf16,",
        "gradient_checkpointing, save_steps, report_to, ...) are accepted too.",
        "",
        "| field | default | meaning |",
        "| --- | --- | --- |",
    ]
    for f in dataclasses.fields(SeqCPOConfig):
        if f.name in train_names or not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", "").replace("|", "\\|")
        lines.append(f"| `{f.name}` | `{default!r}` | {help_text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(config_reference(), end="")
