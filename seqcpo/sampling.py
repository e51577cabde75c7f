"""Sampling helpers shared by every module that draws tokens: the negatives (AN, MN), PSS and evaluation.

All randomness comes from the caller's ``torch.Generator`` objects: one per example where rows belong to
examples (:func:`sample_rows`), and the global RNG only inside :func:`seeded_model_rng`, forked and seeded, for
what a model call draws itself (dropout in train mode, ``model.generate`` sampling). A draw is then reproducible
from its example's seed alone, whatever else ran before it in the process or shared its batch.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then top-p filtering of (N, V) logits (already divided by the temperature), as transformers
    does it: filtered entries become -inf; top-p keeps the smallest set whose mass reaches ``top_p``
    (at least one token)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1)  # ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= 1.0 - top_p
        remove[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(-1, sorted_idx, remove), float("-inf"))
    return logits


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


def sample_rows(probs: torch.Tensor, generators: Sequence[torch.Generator], rows_per_generator: Sequence[int]) -> torch.Tensor:
    """One id per row of ``probs`` (N, V), rows grouped by owner: the first ``rows_per_generator[0]`` rows draw
    from ``generators[0]``, the next from ``generators[1]``, ... Returns (N,) on probs' device.

    Each owner's uniforms come from its own generator (one CPU draw of its row count), and one batched
    inverse-CDF pass turns them into ids: a row's sample depends on its own probabilities and its owner's
    stream only, never on which other rows share the batch.
    """
    if sum(rows_per_generator) != probs.shape[0] or len(rows_per_generator) != len(generators):
        raise ValueError(f"{len(generators)} generators for row counts {list(rows_per_generator)} and {probs.shape[0]} rows")
    if probs.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=probs.device)
    u = torch.cat([torch.rand((n, 1), generator=g) for g, n in zip(generators, rows_per_generator)])  # (N, 1)
    return inverse_cdf_sample(probs, u.to(probs.device)).squeeze(1)


def inverse_cdf_sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token ``i`` of row n for each uniform ``u[n, j]`` in [0, 1) with ``cdf[i-1] <= u * total < cdf[i]``.

    probs (N, V) (need not sum exactly to 1), u (N, S) -> (N, S) ids; zero-probability tokens are never chosen.
    """
    cdf = probs.float().cumsum(-1)  # (N, V)
    target = u * cdf[:, -1:]  # scale by the row total: float32 sums fall a hair short of 1
    return torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[-1] - 1)


@contextlib.contextmanager
def seeded_model_rng(source: torch.Generator | int, device: torch.device) -> Iterator[None]:
    """Fork the global RNG and seed it so that anything random inside a model call (dropout in train mode,
    ``model.generate`` sampling) is reproducible and leaves the caller's RNG untouched.

    ``source``: an int seed (e.g. :func:`seqcpo.seeding.joint_seed`), or a generator to draw the seed from.
    """
    seed = int(source) if isinstance(source, int) else int(torch.randint(0, 2**62, (1,), generator=source).item())
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
