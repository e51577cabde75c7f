"""AN decoding on vLLM's offline engine (``an_backend: vllm``), used when the ``vllm`` package is installed.

vLLM holds its own copy of the weights, loaded once from the model's folder or Hub id, and decodes with
paged attention, continuous batching and CUDA graphs: the fastest way we know to make autoregressive
negatives on a GPU. Because it holds a copy, it can only make negatives with a model whose weights do not
change: the reference (the starting model; docs/method.md default), never the policy being trained. It is never
required: without ``vllm`` the ``shared_prefill`` backend runs, and the tests exercise this module against a
stand-in for vLLM's interface (tests/test_vllm_backend.py); it is not run on a real vLLM in CI (no GPU).

Semantics match the other backends: each prefix gives K continuations (one request with ``n = K``, or one
request per column when each column has its own temperature), a continuation stops at our EOS (kept in it)
or after ``max_new_tokens``; vLLM's own EOS rule is switched off (``ignore_eos``) and ours passed as the only
stop token, as ``generate(eos_token_id=...)`` does. Each request's sampling seed is drawn from its prefix's own
``torch.Generator`` (:mod:`seqcpo.seeding`), so a resumed or differently split run asks for the same negatives.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Sequence

import torch

from seqcpo.seeding import Generators, per_example_generators


def vllm_available() -> bool:
    """Whether the ``vllm`` package can be imported here."""
    return importlib.util.find_spec("vllm") is not None


class VLLMDecoder:
    """vLLM's ``LLM`` over ``model_path``, created on first use and kept.

    Args:
        model_path: a local model folder or Hub id (the starting model's weights, safetensors).
        dtype: "auto" (the checkpoint's), "bfloat16", "float16" or "float32".
        gpu_memory_utilization: the fraction of the GPU vLLM may take for weights and KV cache; leave room
            for training when it runs beside it (default 0.3).
        seed: the engine's base seed (each request also carries its own).
        trust_remote_code: passed through; off unless the user asks.
    """

    def __init__(self, model_path: str, *, dtype: str = "auto", gpu_memory_utilization: float = 0.3, seed: int = 0,
                 trust_remote_code: bool = False, **engine_kwargs: Any):
        if not vllm_available():
            raise ValueError("an_backend 'vllm' needs the vllm package, which is not installed here "
                             "(pip install vllm on a CUDA machine), or use an_backend 'shared_prefill'")
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"vllm gpu_memory_utilization must lie in (0, 1], got {gpu_memory_utilization}")
        self.model_path = model_path
        self.engine_kwargs = dict(
            model=model_path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization, seed=seed,
            skip_tokenizer_init=True, trust_remote_code=trust_remote_code, **engine_kwargs,
        )
        self._llm = None

    @property
    def llm(self):
        if self._llm is None:
            from vllm import LLM

            self._llm = LLM(**self.engine_kwargs)
        return self._llm

    def decode(
        self,
        prefixes: Sequence[Sequence[int]],
        k: int,
        *,
        temperatures: Sequence[float] | None,
        greedy: bool,
        top_k: int,
        top_p: float,
        max_new_tokens: int,
        eos_token_id: int,
        generator: Generators,
    ) -> list[list[list[int]]]:
        """K continuations per prefix. ``temperatures``: one per column (a request per column), else None with
        one temperature for all (then the caller passes it as a one-element list). ``generator``: one per prefix
        (or one for the call); prefix b's request seeds are drawn from ``generator[b]``."""
        from vllm import SamplingParams

        try:
            from vllm.inputs import TokensPrompt
        except ImportError:  # older vLLM: a plain dict is the same prompt
            TokensPrompt = dict  # noqa: N806

        per_column = temperatures is not None and len(temperatures) == k and len(set(temperatures)) > 1
        columns = [[t] for t in temperatures] if per_column else [[temperatures[0] if temperatures else 1.0] * k]
        prompts, params = [], []
        for prefix, g in zip(prefixes, per_example_generators(generator, len(prefixes))):
            for temps in columns:
                seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g).item())
                prompts.append(TokensPrompt(prompt_token_ids=[int(t) for t in prefix]))
                params.append(SamplingParams(
                    n=len(temps), temperature=0.0 if greedy else float(temps[0]), top_k=top_k if top_k > 0 else -1,
                    top_p=top_p, max_tokens=max_new_tokens, seed=seed, ignore_eos=True,
                    stop_token_ids=[eos_token_id], detokenize=False,
                ))
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        per_prompt = [[_with_eos(list(o.token_ids), o.finish_reason, eos_token_id) for o in out.outputs] for out in outputs]
        step = len(columns)
        return [sum(per_prompt[b * step : (b + 1) * step], []) for b in range(len(prefixes))]


def _with_eos(ids: list[int], finish_reason: str | None, eos_token_id: int) -> list[int]:
    """Up to and including the first EOS; a sequence stopped by EOS ends with it even if vLLM left it out."""
    if eos_token_id in ids:
        return ids[: ids.index(eos_token_id) + 1]
    if finish_reason == "stop":
        return ids + [eos_token_id]
    return ids
