"""One decoding configuration for every place that continues a prefix: the AN negatives
(:mod:`seqcpo.negatives.autoregressive`, docs/method.md "Negatives", row AN) and evaluation's generations
(:mod:`seqcpo.evaluation.generate`, specs such as ``sample:t=0.7,p=0.9`` parsed by ``parse_decoding``).

Named ``DecodingConfig``: ``transformers.GenerationConfig`` is another class (built from this one by
:meth:`DecodingConfig.generate_kwargs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

STRATEGIES = ("sample", "greedy", "beam")


@dataclass(frozen=True)
class DecodingConfig:
    """How a model continues a prefix.

    Attributes:
        strategy: "sample", "greedy" or "beam".
        temperature: sampling temperature (> 0) for "sample".
        top_k: keep the k most likely tokens before sampling; 0 disables.
        top_p: nucleus sampling mass in (0, 1]; 1.0 disables.
        num_beams: beams for "beam" (>= 2; AN: >= K).
        temperatures: AN only: optional K temperatures, negative i sampled at temperatures[i] (needed by
            ``rank_by="temperature"``); overrides ``temperature``.
        max_new_tokens: generation length cap (evaluation; AN takes its own ``max_new_tokens``).
        seed: base sampling seed (evaluation).
        name: the label in generation files and reports (default: the strategy; specs name it after themselves).
    """

    strategy: str = "sample"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 4
    temperatures: Sequence[float] | None = None
    max_new_tokens: int = 64
    seed: int = 0
    name: str | None = None

    def __post_init__(self) -> None:
        if self.name is None:
            object.__setattr__(self, "name", self.strategy)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"decoding strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}; use strategy='greedy' for argmax")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.num_beams < 1 or (self.strategy == "beam" and self.num_beams < 2):
            raise ValueError(f"beam search needs num_beams >= 2 (got {self.num_beams}); use 'greedy' for 1")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperatures is not None:
            object.__setattr__(self, "temperatures", [float(t) for t in self.temperatures])
            if self.strategy != "sample":
                raise ValueError("decoding.temperatures needs strategy='sample'")
            if any(not t > 0 for t in self.temperatures):
                raise ValueError(f"every temperature must be > 0, got {self.temperatures}")

    def check_k(self, k: int) -> None:
        """Raise ValueError when this config cannot make K distinct negatives per prefix."""
        if self.strategy == "greedy" and k > 1:
            raise ValueError(
                f"greedy decoding gives one deterministic continuation per prefix, so it cannot make k={k} "
                "AN negatives: use strategy='beam' (num_beams >= k) or strategy='sample'"
            )
        if self.strategy == "beam" and self.num_beams < k:
            raise ValueError(f"beam search returns at most num_beams sequences: need num_beams >= k, got {self.num_beams} < {k}")
        if self.temperatures is not None and len(self.temperatures) != k:
            raise ValueError(f"decoding.temperatures has {len(self.temperatures)} values for k={k}; give one per negative")

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``transformers.GenerationConfig``."""
        if self.strategy == "greedy":
            return {"do_sample": False, "num_beams": 1}
        if self.strategy == "beam":
            return {"do_sample": False, "num_beams": self.num_beams, "early_stopping": True}
        return {"do_sample": True, "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}
