"""Build a negative generator from a short spec string (docs/method.md, "Negatives").

Spec grammar: one name, ``"tn" | "bn" | "mn" | "an" | "data"`` (all K negatives from it; ``"an:4"`` with the
count equal to K is accepted too), or a mixture ``"an:2,tn:2"`` whose counts sum to K, listed best
first for the ranked objective (see :mod:`seqcpo.negatives.mixture`). ``data`` is a preference row's own
rejected answers (:mod:`seqcpo.negatives.data`): ``"data:1,tn:3"`` puts them first, synthetic ones after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from seqcpo.negatives.autoregressive import AutoregressiveNegatives, DecodingConfig
from seqcpo.negatives.base import NegativeGenerator, check_k
from seqcpo.negatives.batch import BatchNegatives
from seqcpo.negatives.mean_field import MeanFieldNegatives
from seqcpo.negatives.mixture import MixtureNegatives
from seqcpo.negatives.truncation import TruncationNegatives

GENERATOR_NAMES = ("tn", "bn", "mn", "an", "data")
#: the generators that make negatives (every name but "data", which reads them from the examples)
SYNTHETIC_NAMES = ("tn", "bn", "mn", "an")

BACKEND_CHOICES = ("auto", "shared_prefill", "hf", "vllm")


@dataclass(frozen=True)
class NegativeOption:
    """One option of the negative generators, declared once: :class:`seqcpo.training.config.SeqCPOConfig`
    makes its field from it (``config_name``), :func:`build_negative_generator` reads its default, the config
    checks its ``check`` range and ``choices``, and ``docs/CONFIG.md`` prints its ``help``."""

    help: str
    default: Any
    check: str | None = None  # a range rule of seqcpo.config_loader.check_value
    choices: tuple[str, ...] | None = None
    config_name: str | None = None  # the SeqCPOConfig field, when not the option's own name
    vllm_only: bool = False  # passed on only when the AN backend is vllm
    speed_only: bool = False  # changes how fast the rows are made, never which (not compared between runs)


#: option key -> its declaration. Keys for a generator not in the spec are accepted and ignored.
OPTIONS: dict[str, NegativeOption] = {
    "max_tries": NegativeOption(
        "Draws in all before a copy of the gold is dropped (valid=False), every generator.", 8, ">=1",
        config_name="neg_max_tries"),
    "tn_min_keep": NegativeOption("TN: fewest gold tokens a truncation keeps before the EOS.", 1, ">=1"),
    "mn_c": NegativeOption("MN: fraction c of continuation positions replaced (unranked).", 0.15, "[0,1]"),
    "mn_sample": NegativeOption("MN: sample the replacement (true) or take the argmax (false).", True),
    "mn_temperature": NegativeOption("MN: sampling temperature.", 1.0, ">0"),
    "mn_c_range": NegativeOption("MN ranked: the K values of c spread over this (low, high) range.", (0.05, 0.5)),
    "an_strategy": NegativeOption("AN decoding: sample | greedy | beam.", "sample",
                                  choices=("sample", "greedy", "beam")),
    "an_temperature": NegativeOption("AN: sampling temperature.", 1.0, ">0"),
    "an_top_k": NegativeOption("AN: top-k filter (0 = off).", 0, ">=0"),
    "an_top_p": NegativeOption("AN: nucleus mass (1 = off).", 1.0, "(0,1]"),
    "an_num_beams": NegativeOption("AN: beams for beam search (>= its count of negatives).", 4, ">=1"),
    "an_temperatures": NegativeOption(
        "AN ranked by temperature: one sampling temperature per AN negative, best (lowest) first.", None),
    "an_max_new_tokens": NegativeOption("AN: longest negative in tokens.", 64, ">=1"),
    "an_backend": NegativeOption(
        "AN: auto | shared_prefill | hf | vllm. shared_prefill: one cached prefill per prefix (prefixes of "
        "one another, as a document row's anchors, share their longest one's), our decoding loop; hf: model.generate; vllm: vLLM's engine over the starting model's weights (needs the vllm package "
        "and a GPU; reference-made negatives only). auto: vllm in `seqcpo negatives` when vllm and CUDA are "
        "present, shared_prefill otherwise (training opts into vllm explicitly: it shares the GPU).",
        "auto", choices=BACKEND_CHOICES),
    "an_vllm_model": NegativeOption(
        "AN on vLLM: the weights folder or Hub id (default: the model's own name_or_path).", None, vllm_only=True),
    "an_vllm_dtype": NegativeOption("AN on vLLM: auto (the checkpoint's) or a dtype name.", "auto", vllm_only=True),
    "an_vllm_gpu_memory_utilization": NegativeOption(
        "AN on vLLM: fraction of the GPU vLLM may take (leave room for training).", 0.3, "(0,1]", vllm_only=True,
        speed_only=True),
    "an_batch_size": NegativeOption("AN: prefixes decoded together, K rows each (`seqcpo negatives` on windows "
                                    "gathers them from consecutive batches when every negative draws per example: "
                                    "AN, TN, data; each prefix draws from its own generator, so the rows do not "
                                    "depend on it).", 16, ">=1", speed_only=True),
    "an_rank_by": NegativeOption("AN ranked: rouge (ROUGE-L F to the gold) | temperature.", "rouge",
                                 choices=("rouge", "temperature")),
}


def content_options(opts: dict[str, Any]) -> dict[str, Any]:
    """``opts`` without the options that only change speed (a folder of negatives made with another
    ``an_batch_size`` holds the same rows)."""
    return {k: v for k, v in opts.items() if not (k in OPTIONS and OPTIONS[k].speed_only)}


def resolve_an_backend(backend: str, offline: bool = False, reference_made: bool = True) -> str:
    """``an_backend`` with "auto" resolved: vLLM for `seqcpo negatives` (``offline``) of reference-made
    negatives when vllm and CUDA are present, else shared_prefill."""
    if backend != "auto":
        return backend
    if offline and reference_made:
        from seqcpo.negatives.vllm_backend import vllm_available

        if vllm_available() and torch.cuda.is_available():
            return "vllm"
    return "shared_prefill"


def check_options(opts: dict[str, Any]) -> None:
    """ValueError naming the option when a value breaks its declared range (the generators check choices)."""
    from seqcpo.config_loader import check_value

    for key, value in opts.items():
        opt = OPTIONS[key]
        why = check_value(value, opt.check) if opt.check else None
        if why:
            raise ValueError(f"{key}={value!r}: {why}")


def parse_spec(spec: str | Sequence[tuple[str, int]], k: int) -> list[tuple[str, int]]:
    """``"tn:2,bn:2"`` -> ``[("tn", 2), ("bn", 2)]``; a single name without a count gets all K.

    The config parses its ``negatives`` string once (``SeqCPOConfig.negatives_parts``) and hands the parts on;
    parts given as a list are checked (known names, counts >= 1, no repeats, sum K) and returned as they are.
    """
    check_k("negatives", k)
    if not isinstance(spec, str):
        return _check_parts([(str(name), count) for name, count in spec], k, repr(list(spec)))
    items = [item.strip() for item in spec.strip().lower().split(",")]
    if not spec.strip() or any(not item for item in items):
        raise ValueError(f"empty generator in negatives spec {spec!r}; expected e.g. 'an' or 'an:2,tn:2'")
    parts: list[tuple[str, int]] = []
    for item in items:
        name, sep, count_str = item.partition(":")
        if name.strip() not in GENERATOR_NAMES:
            raise ValueError(f"unknown negative generator {name.strip()!r} in spec {spec!r}; choose from {GENERATOR_NAMES}")
        if not sep:
            if len(items) > 1:
                raise ValueError(f"mixture spec {spec!r} needs a count for every generator, e.g. 'an:2,tn:2'")
            parts.append((name.strip(), k))
            continue
        try:
            parts.append((name.strip(), int(count_str)))
        except ValueError:
            raise ValueError(f"count of {name.strip()!r} in spec {spec!r} is not an integer: {count_str!r}") from None
    return _check_parts(parts, k, repr(spec))


def _check_parts(parts: list[tuple[str, int]], k: int, spec: str) -> list[tuple[str, int]]:
    seen: set[str] = set()
    for name, count in parts:
        if name not in GENERATOR_NAMES:
            raise ValueError(f"unknown negative generator {name!r} in spec {spec}; choose from {GENERATOR_NAMES}")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError(f"count of {name!r} in spec {spec} must be >= 1, got {count}")
        if name in seen:
            raise ValueError(f"generator {name!r} appears twice in spec {spec}; merge its counts")
        seen.add(name)
    total = sum(c for _, c in parts)
    if total != k:
        raise ValueError(f"the counts in negatives spec {spec} sum to {total}, but num_negatives (K) = {k}")
    return parts


def build_negative_generator(
    spec: str | Sequence[tuple[str, int]],
    k: int,
    *,
    model: torch.nn.Module | None = None,
    eos_token_id: int,
    pad_token_id: int,
    options: dict[str, Any] | None = None,
) -> NegativeGenerator:
    """Build the generator named by ``spec`` that makes K negatives per example.

    Args:
        spec: "tn", "bn", "mn", "an", "data", or a mixture "an:2,tn:2" / "data:1,tn:3" (counts sum to K, best
            first); or the parts :func:`parse_spec` made of one, ``[("an", 2), ("tn", 2)]``.
        k: negatives per example.
        model: the model AN and MN run (docs/method.md default: the reference model); required for them.
        eos_token_id, pad_token_id: the tokenizer's EOS and pad ids.
        options: optional overrides, all keys optional; the keys, defaults and ranges are :data:`OPTIONS`
            (an_backend "auto" means shared_prefill here). Unknown keys raise ValueError listing the valid ones.

    Returns:
        A single generator, or a :class:`MixtureNegatives` for a mixture spec. Errors that depend on K
        (greedy AN with K > 1, too few beams, a wrong number of temperatures) are raised here.
    """
    opts = dict(options or {})
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown negatives option(s) {unknown}; valid options: {sorted(OPTIONS)}")
    o = {key: opts.get(key, opt.default) for key, opt in OPTIONS.items()}
    check_options({k: v for k, v in o.items() if v is not None})
    o["an_backend"] = resolve_an_backend(o["an_backend"])
    parts = parse_spec(spec, k)

    def build(name: str, count: int) -> NegativeGenerator:
        if name in ("mn", "an") and model is None:
            raise ValueError(f"negative generator {name!r} runs a model: pass model=... (docs/method.md default: the reference model)")
        if name == "tn":
            return TruncationNegatives(eos_token_id, min_keep=o["tn_min_keep"], max_tries=o["max_tries"])
        if name == "bn":
            return BatchNegatives(max_tries=o["max_tries"])
        if name == "mn":
            return MeanFieldNegatives(
                model, c=o["mn_c"], sample=o["mn_sample"], temperature=o["mn_temperature"],
                c_range=tuple(o["mn_c_range"]), pad_token_id=pad_token_id, max_tries=o["max_tries"],
            )
        decoding = DecodingConfig(
            strategy=o["an_strategy"], temperature=o["an_temperature"], top_k=o["an_top_k"],
            top_p=o["an_top_p"], num_beams=o["an_num_beams"], temperatures=o["an_temperatures"],
        )
        decoding.check_k(count)
        vllm = None
        if o["an_backend"] == "vllm" and decoding.strategy != "beam":
            from seqcpo.negatives.vllm_backend import VLLMDecoder

            path = o["an_vllm_model"] or getattr(getattr(model, "config", None), "_name_or_path", None)
            if not path:
                raise ValueError("an_backend 'vllm' needs the weights' folder or Hub id: set an_vllm_model")
            vllm = VLLMDecoder(path, dtype=o["an_vllm_dtype"], gpu_memory_utilization=o["an_vllm_gpu_memory_utilization"])
        return AutoregressiveNegatives(
            model, decoding, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
            max_new_tokens=o["an_max_new_tokens"], backend=o["an_backend"], batch_size=o["an_batch_size"],
            rank_by=o["an_rank_by"], max_tries=o["max_tries"], vllm=vllm,
        )

    built = {name: build(name, count) for name, count in parts if name != "data"}
    if "data" in dict(parts):
        from seqcpo.negatives.data import DataNegatives

        # a row short of rejected answers fills its data slots from the first synthetic generator listed
        built["data"] = DataNegatives(fill=next(iter(built.values()), None))
    gens = [(built[name], count) for name, count in parts]
    return gens[0][0] if len(gens) == 1 else MixtureNegatives(gens)
