"""Build a negative generator from a short spec string (PAPER.md, "Negatives").

Spec grammar: one name, ``"tn" | "bn" | "mn" | "an"`` (all K negatives from it; ``"an:4"`` with the
count equal to K is accepted too), or a mixture ``"an:2,tn:2"`` whose counts sum to K, listed best
first for the ranked objective (see :mod:`seqcpo.negatives.mixture`).
"""

from __future__ import annotations

from typing import Any

import torch

from seqcpo.negatives.autoregressive import AutoregressiveNegatives, DecodingConfig
from seqcpo.negatives.base import NegativeGenerator
from seqcpo.negatives.batch import BatchNegatives
from seqcpo.negatives.mean_field import MeanFieldNegatives
from seqcpo.negatives.mixture import MixtureNegatives
from seqcpo.negatives.truncation import TruncationNegatives

GENERATOR_NAMES = ("tn", "bn", "mn", "an")

#: option key -> (help, default). Keys for a generator not in the spec are accepted and ignored.
OPTIONS: dict[str, tuple[str, Any]] = {
    "max_tries": ("draws in all before a copy of the gold is dropped (valid=False), every generator", 8),
    "tn_min_keep": ("TN: fewest gold tokens a truncation keeps", 1),
    "mn_c": ("MN: replacement probability per position (unranked)", 0.15),
    "mn_sample": ("MN: sample the replacement (True) or take the argmax (False)", True),
    "mn_temperature": ("MN: sampling temperature", 1.0),
    "mn_c_range": ("MN ranked: (low, high) spread of c over the K negatives", (0.05, 0.5)),
    "an_strategy": ("AN: 'sample', 'greedy' or 'beam'", "sample"),
    "an_temperature": ("AN: sampling temperature", 1.0),
    "an_top_k": ("AN: top-k filter, 0 disables", 0),
    "an_top_p": ("AN: nucleus mass, 1.0 disables", 1.0),
    "an_num_beams": ("AN: beams for beam search (>= its count)", 4),
    "an_temperatures": ("AN: one sampling temperature per AN negative (needed by an_rank_by='temperature')", None),
    "an_max_new_tokens": ("AN: longest negative in tokens", 64),
    "an_backend": ("AN: 'shared_prefill', 'hf' or 'vllm'", "shared_prefill"),
    "an_vllm_model": ("AN on vLLM: the weights folder or Hub id (default: the model's own name_or_path)", None),
    "an_vllm_dtype": ("AN on vLLM: 'auto' or a dtype name", "auto"),
    "an_vllm_gpu_memory_utilization": ("AN on vLLM: fraction of the GPU vLLM may take", 0.3),
    "an_batch_size": ("AN: prefixes per generation call", 16),
    "an_rank_by": ("AN ranked: 'rouge' or 'temperature'", "rouge"),
}


def parse_spec(spec: str, k: int) -> list[tuple[str, int]]:
    """``"tn:2,bn:2"`` -> ``[("tn", 2), ("bn", 2)]``; a single name without a count gets all K."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    items = [item.strip() for item in spec.strip().lower().split(",")]
    if not spec.strip() or any(not item for item in items):
        raise ValueError(f"empty generator in negatives spec {spec!r}; expected e.g. 'an' or 'an:2,tn:2'")
    parts: list[tuple[str, int]] = []
    for item in items:
        name, sep, count_str = item.partition(":")
        name = name.strip()
        if name not in GENERATOR_NAMES:
            raise ValueError(f"unknown negative generator {name!r} in spec {spec!r}; choose from {GENERATOR_NAMES}")
        if not sep:
            if len(items) > 1:
                raise ValueError(f"mixture spec {spec!r} needs a count for every generator, e.g. 'an:2,tn:2'")
            count = k
        else:
            try:
                count = int(count_str)
            except ValueError:
                raise ValueError(f"count of {name!r} in spec {spec!r} is not an integer: {count_str!r}") from None
            if count < 1:
                raise ValueError(f"count of {name!r} in spec {spec!r} must be >= 1, got {count}")
        if name in (n for n, _ in parts):
            raise ValueError(f"generator {name!r} appears twice in spec {spec!r}; merge its counts")
        parts.append((name, count))
    total = sum(c for _, c in parts)
    if total != k:
        raise ValueError(f"the counts in negatives spec {spec!r} sum to {total}, but k={k}")
    return parts


def build_negative_generator(
    spec: str,
    k: int,
    *,
    model: torch.nn.Module | None = None,
    eos_token_id: int,
    pad_token_id: int,
    options: dict[str, Any] | None = None,
) -> NegativeGenerator:
    """Build the generator named by ``spec`` that makes K negatives per example.

    Args:
        spec: "tn", "bn", "mn", "an", or a mixture "an:2,tn:2" (counts sum to K, best first).
        k: negatives per example.
        model: the model AN and MN run (PAPER.md default: the reference model); required for them.
        eos_token_id, pad_token_id: the tokenizer's EOS and pad ids.
        options: optional overrides, all keys optional (defaults in brackets):
            max_tries [8]: draws before a copy of the gold is dropped (valid=False);
            tn_min_keep [1];
            mn_c [0.15], mn_sample [True], mn_temperature [1.0], mn_c_range [(0.05, 0.5)];
            an_strategy ["sample"], an_temperature [1.0], an_top_k [0], an_top_p [1.0], an_num_beams [4],
            an_temperatures [None], an_max_new_tokens [64], an_backend ["shared_prefill"],
            an_batch_size [16], an_rank_by ["rouge"]; with an_backend "vllm": an_vllm_model [the model's
            ``config._name_or_path``], an_vllm_dtype ["auto"], an_vllm_gpu_memory_utilization [0.3].
            Unknown keys raise ValueError listing the valid ones.

    Returns:
        A single generator, or a :class:`MixtureNegatives` for a mixture spec. Errors that depend on K
        (greedy AN with K > 1, too few beams, a wrong number of temperatures) are raised here.
    """
    opts = dict(options or {})
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown negatives option(s) {unknown}; valid options: {sorted(OPTIONS)}")
    o = {key: opts.get(key, default) for key, (_, default) in OPTIONS.items()}
    parts = parse_spec(spec, k)

    def build(name: str, count: int) -> NegativeGenerator:
        if name in ("mn", "an") and model is None:
            raise ValueError(f"negative generator {name!r} runs a model: pass model=... (PAPER.md default: the reference model)")
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

    gens = [(build(name, count), count) for name, count in parts]
    return gens[0][0] if len(gens) == 1 else MixtureNegatives(gens)
