"""Reference strategies, each refused combination, and a CPO gradient step that does what it should."""

import pytest
import torch

from conftest import make_tiny_llama
from seqcpo.logps import sequence_logps
from seqcpo.losses import cpo_loss
from seqcpo.reference import (
    AdapterDisabledReference,
    FrozenCopyReference,
    PrecomputedReference,
    build_reference,
)
from seqcpo.types import CandidateBatch


def _batch(K=2):
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, 96, (n,), generator=g).tolist()  # noqa: E731
    return CandidateBatch(
        prefix_ids=[ids(6), ids(4)],
        candidate_ids=[[ids(5) for _ in range(K + 1)] for _ in range(2)],
        candidate_mask=[[True] * (K + 1)] * 2,
    )


def test_gradient_step_raises_gold_and_lowers_negatives():
    model = make_tiny_llama()
    ref = FrozenCopyReference(model)
    batch = _batch(K=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = sequence_logps(model, batch).logps.detach()
    loss = cpo_loss(sequence_logps(model, batch).logps, ref.logps(batch), beta=1.0)
    loss.backward()
    opt.step()
    after = sequence_logps(model, batch).logps.detach()
    assert (after[:, 0] > before[:, 0]).all(), "gold log-prob should rise"
    assert (after[:, 1:] < before[:, 1:]).all(), "negative log-probs should fall"
    # the frozen copy did not move
    assert torch.allclose(ref.logps(batch), before, atol=1e-5)


def test_frozen_copy_is_frozen_and_in_eval_mode():
    model = make_tiny_llama()
    model.train()
    ref = FrozenCopyReference(model)
    assert not ref.model.training
    assert all(not p.requires_grad for p in ref.model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert ref.model is not model


def test_precomputed_reads_the_batch():
    batch = _batch()
    batch.ref_logps = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    assert torch.equal(PrecomputedReference().logps(batch), batch.ref_logps)
    batch.ref_logps = None
    with pytest.raises(ValueError, match="seqcpo negatives"):
        PrecomputedReference().logps(batch)


def test_adapter_disabled_equals_base_model():
    peft = pytest.importorskip("peft")
    base = make_tiny_llama()
    start = sequence_logps(base, _batch()).logps.detach()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # make the adapter do something, as training would
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.train()
    ref = AdapterDisabledReference(model)
    batch = _batch()
    assert torch.allclose(ref.logps(batch), start, atol=1e-5)
    assert not torch.allclose(sequence_logps(model, batch).logps, start, atol=1e-3)
    assert model.training, "the policy's train mode is restored"
    assert build_reference("auto", model, negatives_offline=False).name == "adapter_disabled"


def test_build_reference_choices_and_refusals():
    model = make_tiny_llama()
    assert build_reference("auto", model, negatives_offline=False).name == "frozen_copy"
    assert build_reference("auto", model, negatives_offline=True, offline_has_ref_logps=True).name == "precomputed"
    assert build_reference("auto", model, negatives_offline=True, offline_has_ref_logps=False).name == "frozen_copy"
    with pytest.raises(ValueError, match="negatives made during training"):
        build_reference("precomputed", model, negatives_offline=False)
    with pytest.raises(ValueError, match="none"):
        build_reference("precomputed", model, negatives_offline=True, offline_has_ref_logps=False)
    with pytest.raises(ValueError, match="LoRA"):
        build_reference("adapter_disabled", model, negatives_offline=False)
    with pytest.raises(ValueError, match="must be one of"):
        build_reference("ema", model, negatives_offline=False)
    other = make_tiny_llama(seed=5)
    ref = build_reference("frozen_copy", model, negatives_offline=False, reference_model=other)
    assert ref.model is other


def test_frozen_copy_in_bf16_is_close_and_leaves_the_policy_alone():
    model = make_tiny_llama()
    ref = build_reference("frozen_copy", model, negatives_offline=False, reference_dtype=torch.bfloat16)
    assert next(ref.model.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32
    batch = _batch()
    exact = sequence_logps(model, batch).logps.detach()
    approx = ref.logps(batch)
    assert approx.dtype == torch.float32
    assert torch.allclose(approx, exact, rtol=0.05, atol=0.5)
