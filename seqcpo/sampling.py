"""Sampling helpers shared by every module that draws tokens: the negatives (AN, MN), PSS and evaluation.

All randomness comes from an explicit ``torch.Generator`` so that a draw is reproducible from its seed alone,
whatever else ran before it in the process (PAPER.md leaves the seeds open; we fix them per example).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def sample_categorical(probs: torch.Tensor, generator: torch.Generator, num_samples: int = 1) -> torch.Tensor:
    """Draw ``num_samples`` ids per row of ``probs`` (N, V) with replacement: (N, num_samples), on probs' device.

    Uses ``torch.multinomial`` when the generator lives on ``probs``' device; otherwise (a CPU generator,
    logits on an accelerator) inverse-CDF sampling with uniforms from the generator, so all randomness
    still comes from it.
    """
    if probs.device == generator.device:
        return torch.multinomial(probs, num_samples, replacement=True, generator=generator)
    u = torch.rand((probs.shape[0], num_samples), generator=generator, device=generator.device)
    return inverse_cdf_sample(probs, u.to(probs.device))


def inverse_cdf_sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token ``i`` of row n for each uniform ``u[n, j]`` in [0, 1) with ``cdf[i-1] <= u * total < cdf[i]``.

    probs (N, V) (need not sum exactly to 1), u (N, S) -> (N, S) ids; zero-probability tokens are never chosen.
    """
    cdf = probs.float().cumsum(-1)  # (N, V)
    target = u * cdf[:, -1:]  # scale by the row total: float32 sums fall a hair short of 1
    return torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[-1] - 1)


@contextlib.contextmanager
def seeded_model_rng(generator: torch.Generator, device: torch.device) -> Iterator[None]:
    """Fork the global RNG and seed it from ``generator`` so that anything random inside a model call
    (dropout in train mode, ``model.generate`` sampling) is reproducible and leaves the caller's RNG untouched.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield
        return
    # Fork and seed only the model's device (torch.manual_seed would reseed every GPU for good).
    with torch.random.fork_rng(devices=[device], device_type=device.type):
        torch.random.default_generator.manual_seed(seed)
        backend = getattr(torch, device.type)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        elif hasattr(backend, "manual_seed"):
            backend.manual_seed(seed)
        yield


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameter-less stub)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
