"""Reference-model strategies: where ``logp_ref(y_i|x)`` of docs/method.md comes from.

The reference is the model at the start of CPO training, frozen (docs/method.md, our default). Three ways to
have it:

- ``frozen_copy`` (:class:`FrozenCopyReference`): a copy of the starting model, in eval mode, with no
  gradients, run in the same layout as the policy.
- ``precomputed`` (:class:`PrecomputedReference`): the log-probs were computed once when fixed negatives
  were made offline (``seqcpo negatives``) and travel with the batch; no reference model in memory at all.
  A fixed negative's reference log-prob never changes, so this is exact.
- ``adapter_disabled`` (:class:`AdapterDisabledReference`): for a LoRA policy (peft), the same model with its
  adapter switched off *is* the starting model; no second copy of the weights.
- ``none`` (:class:`NoReference`): reference-free (SimPO's form, docs/method.md "Reference-free"): the log-ratio
  is replaced by the policy's length-normalised log-prob, so the reference log-probs are zeros; no model, no
  forward pass, no memory.

:func:`build_reference` picks one and refuses combinations that cannot work.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Protocol, runtime_checkable

import torch

from seqcpo.logps import sequence_logps
from seqcpo.two_pass import gold_pass, negatives_pass
from seqcpo.types import CandidateBatch

REFERENCE_STRATEGIES = ("auto", "frozen_copy", "precomputed", "adapter_disabled", "none")


@runtime_checkable
class Reference(Protocol):
    """Gives (B, K+1) reference log-probs for a batch, without gradient."""

    name: str

    def logps(self, batch: CandidateBatch) -> torch.Tensor:
        ...


class _LogpsOptions:
    def __init__(self, layout: str = "shared", pad_token_id: int = 0, length_normalize: bool = False, chunk_size: int = 1024):
        self.layout = layout
        self.pad_token_id = pad_token_id
        self.length_normalize = length_normalize
        self.chunk_size = chunk_size

    def run(self, model, batch: CandidateBatch) -> torch.Tensor:
        return sequence_logps(
            model,
            batch,
            layout=self.layout,
            pad_token_id=self.pad_token_id,
            length_normalize=self.length_normalize,
            chunk_size=self.chunk_size,
        ).logps


class _TwoPassMixin:
    """Reference scoring split in two (:mod:`seqcpo.two_pass`), so that MN negatives can be drawn from the
    reference's own gold-branch logits: :meth:`gold_pass`, make the negatives, then :meth:`finish`."""

    def _context(self):
        return contextlib.nullcontext()

    @torch.no_grad()
    def gold_pass(self, prefix_ids, gold_ids, want_logits: bool = True):
        with self._context():
            return gold_pass(self.model, prefix_ids, gold_ids, pad_token_id=self.options.pad_token_id,
                             chunk_size=self.options.chunk_size, want_logits=want_logits)

    @torch.no_grad()
    def finish(self, gp, negative_ids) -> torch.Tensor:
        """(B, K+1) reference log-probs of the gold of ``gp`` and ``negative_ids``."""
        with self._context():
            out = negatives_pass(self.model, gp, negative_ids, pad_token_id=self.options.pad_token_id,
                                 chunk_size=self.options.chunk_size, length_normalize=self.options.length_normalize)
        return out.logps.float()


class FrozenCopyReference(_TwoPassMixin):
    """A frozen copy of the starting model.

    Args:
        model: the starting model; it is deep-copied unless ``copy_model=False`` (pass a separately loaded
            model that way, e.g. when resuming, where the policy no longer is the starting model).
        dtype / device: where the copy lives (e.g. bf16 to halve its memory).
    """

    name = "frozen_copy"

    def __init__(self, model, *, copy_model: bool = True, dtype: torch.dtype | None = None, device=None, **logps_options):
        ref = copy.deepcopy(model) if copy_model else model
        if dtype is not None:
            ref = ref.to(dtype=dtype)
        if device is not None:
            ref = ref.to(device)
        ref.eval()
        ref.requires_grad_(False)
        self.model = ref
        self.options = _LogpsOptions(**logps_options)

    @torch.no_grad()
    def logps(self, batch: CandidateBatch) -> torch.Tensor:
        return self.options.run(self.model, batch).float()


class PrecomputedReference:
    """Reference log-probs stored with fixed negatives; reads ``batch.ref_logps`` (B, K+1)."""

    name = "precomputed"

    def logps(self, batch: CandidateBatch) -> torch.Tensor:
        if batch.ref_logps is None:
            raise ValueError(
                "reference 'precomputed' needs reference log-probs stored with the negatives; this batch has none. "
                "Make the negatives with `seqcpo negatives` (it stores them), or use reference 'frozen_copy'."
            )
        ref = batch.ref_logps
        return ref if isinstance(ref, torch.Tensor) else torch.tensor(ref, dtype=torch.float32)


class NoReference:
    """Reference-free: (B, K+1) zeros, so ``s_i = beta * logp_policy(y_i|x)`` (length-normalised by the caller)."""

    name = "none"

    def logps(self, batch: CandidateBatch) -> torch.Tensor:
        return torch.zeros((len(batch), batch.num_candidates), dtype=torch.float32)


def is_peft_model(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class AdapterDisabledReference(_TwoPassMixin):
    """The LoRA policy with its adapter switched off, in eval mode (no dropout), without gradient."""

    name = "adapter_disabled"

    def __init__(self, peft_model, **logps_options):
        if not is_peft_model(peft_model):
            raise ValueError(
                "reference 'adapter_disabled' needs a LoRA (peft) policy; this model has no adapter. "
                "Enable LoRA (lora: true) or use reference 'frozen_copy'."
            )
        self.model = peft_model
        self.options = _LogpsOptions(**logps_options)

    @contextlib.contextmanager
    def _context(self):
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter():
                yield
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def logps(self, batch: CandidateBatch) -> torch.Tensor:
        with self._context():
            return self.options.run(self.model, batch).float()


def build_reference(
    strategy: str,
    model,
    *,
    negatives_offline: bool,
    offline_has_ref_logps: bool = False,
    reference_model=None,
    reference_dtype: torch.dtype | None = None,
    **logps_options,
) -> Reference:
    """Choose and build the reference, refusing combinations that cannot work.

    Args:
        strategy: one of ``REFERENCE_STRATEGIES``. "auto" picks ``precomputed`` when offline negatives carry
            reference log-probs, else ``adapter_disabled`` for a LoRA policy, else ``frozen_copy``.
        model: the policy at the start of training.
        negatives_offline: True when every negative is fixed and read from disk (``seqcpo negatives``);
            False when any negative is made during training.
        offline_has_ref_logps: the offline negatives carry reference log-probs.
        reference_model: for ``frozen_copy``, an already loaded starting model to use instead of a copy.
        reference_dtype: for ``frozen_copy``, the dtype the copy is kept in (e.g. bf16: half the memory).
    """
    if strategy not in REFERENCE_STRATEGIES:
        raise ValueError(f"reference must be one of {', '.join(REFERENCE_STRATEGIES)}; got {strategy!r}")
    if strategy == "auto":
        if negatives_offline and offline_has_ref_logps:
            strategy = "precomputed"
        elif is_peft_model(model):
            strategy = "adapter_disabled"
        else:
            strategy = "frozen_copy"
    if strategy == "none":
        return NoReference()
    if strategy == "precomputed":
        if not negatives_offline:
            raise ValueError(
                "reference 'precomputed' cannot work with negatives made during training: their reference "
                "log-probs do not exist in advance. Make fixed negatives with `seqcpo negatives` and train with "
                "negatives_path, or set reference to 'frozen_copy' (or 'adapter_disabled' for a LoRA policy)."
            )
        if not offline_has_ref_logps:
            raise ValueError(
                "reference 'precomputed' needs reference log-probs stored with the offline negatives; these have "
                "none. Re-make them with `seqcpo negatives` (which stores them) or set reference to 'frozen_copy'."
            )
        return PrecomputedReference()
    if strategy == "adapter_disabled":
        return AdapterDisabledReference(model, **logps_options)
    if reference_model is not None:
        return FrozenCopyReference(reference_model, copy_model=False, dtype=reference_dtype, **logps_options)
    return FrozenCopyReference(model, dtype=reference_dtype, **logps_options)
