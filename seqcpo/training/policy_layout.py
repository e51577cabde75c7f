"""Which log-prob layout the policy runs in (docs/method.md, "The objective": how the log-probs are computed does not change them): the configured
``logps_layout`` checked against how the model is trained, and ``auto`` resolved per batch, in agreement
across processes."""

from __future__ import annotations

from typing import Callable

import torch

from seqcpo.logps import choose_layout
from seqcpo.two_pass import two_pass_supported
from seqcpo.types import CandidateBatch

# the layouts `auto` may choose for the policy (seqcpo.logps.choose_layout)
AGREED_LAYOUTS = ("shared", "packed", "two_pass")


def check_layout(layout: str, model, *, head_in_forward: bool, checkpointing: bool) -> None:
    """ValueError when ``layout`` cannot run this way: ``two_pass`` needs the LM head outside the model's forward
    and a KV cache in training (no FSDP / ZeRO-3, no gradient checkpointing); ``packed`` needs the head outside."""
    if layout == "two_pass" and (head_in_forward or checkpointing or not two_pass_supported(model)):
        raise ValueError(
            "logps_layout two_pass needs the LM head outside the model's forward and a KV cache in training: "
            "it cannot run with FSDP / DeepSpeed ZeRO-3 or gradient checkpointing; use 'auto' or 'shared'"
        )
    if layout == "packed" and head_in_forward:
        raise ValueError("logps_layout packed needs the LM head outside the model's forward: it cannot run with "
                         "FSDP / DeepSpeed ZeRO-3; use 'auto' or 'shared'")


def agreed_layout(
    layout: str,
    model,
    batch: CandidateBatch,
    *,
    head_in_forward: bool,
    num_processes: int = 1,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device=None,
) -> str:
    """``layout`` for this batch; with ``auto`` under several processes, one choice for all of them.

    Every process must run the same layout: the two-pass layout calls the wrapped model twice and each DDP
    forward is a collective (buffer broadcast, gradient hooks), so two processes choosing differently per batch
    wait on each other forever. A layout every process chose is kept; otherwise "shared" (same numbers).
    ``reduce_sum`` sums a tensor over the processes (one all-reduce of a 3-vector of votes).
    """
    if layout != "auto":
        return layout
    choice = choose_layout(model, batch, head_in_forward=head_in_forward)
    if num_processes == 1 or reduce_sum is None:
        return choice
    votes = torch.zeros(len(AGREED_LAYOUTS), dtype=torch.float32, device=device)
    votes[AGREED_LAYOUTS.index(choice)] = 1.0
    votes = reduce_sum(votes)
    return choice if int(votes[AGREED_LAYOUTS.index(choice)].item()) == num_processes else "shared"
