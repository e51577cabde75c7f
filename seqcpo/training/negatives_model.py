"""The model that makes AN / MN negatives during training (docs/method.md, "Negatives": the reference by
default, or the policy with ``negatives_model: policy``, refreshed every ``negatives_refresh_steps``)."""

from __future__ import annotations

import contextlib
import copy

import torch

from seqcpo.hf_model import unwrap_model
from seqcpo.reference import AdapterDisabledReference, FrozenCopyReference


class PolicySnapshot:
    """The policy as it stands (``every <= 1``), or a frozen copy of it refreshed every ``every`` steps, at the
    multiples of ``every``: a resumed run takes its snapshot at the same step as the uninterrupted one."""

    def __init__(self, every: int):
        self.every = int(every)
        self.model = None
        self.step = -1

    def __call__(self, policy, step: int):
        if self.every <= 1:
            return policy
        if self.model is None or step - self.step >= self.every:
            self.model = copy.deepcopy(policy).eval().requires_grad_(False)
            self.step = step - step % self.every
        return self.model


def negatives_model(choice: str, reference, policy, policy_for_negatives) -> torch.nn.Module:
    """The model the AN / MN generators are built on, once, at the trainer's construction.

    ``choice``: "reference" or "policy"; ``policy_for_negatives()`` gives the policy to use at each call
    (:class:`PolicySnapshot`). The reference is its frozen copy, or the LoRA policy with the adapter off
    (the starting model); without a model reference (precomputed) the policy itself.
    """
    if choice == "policy":
        return _ModelView(policy_for_negatives)
    if isinstance(reference, FrozenCopyReference):
        return reference.model
    if isinstance(reference, AdapterDisabledReference):
        peft_model = reference.model
        return _ModelView(lambda: peft_model, peft_model.disable_adapter)
    return unwrap_model(policy)


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
