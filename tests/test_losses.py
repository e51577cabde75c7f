"""Hand-derived values of the objectives (docs/method.md, "The objective").

Notation: s_i = beta * (policy_i - ref_i). In every case below the policy/ref values are chosen so that
the s_i are logs of small integers, making the expected losses closed-form:

K = 1, s = [1, 0]:
    plain = ranked = -log sigmoid(1 - 0) = log(1 + e^-1) = 0.3132616875...
K = 2, s = [ln 2, 0, 0] (exp: 2, 1, 1; sum 4):
    plain  = -(ln 2 - ln 4) = ln 2
    ranked = -[(ln 2 - ln 4) + (0 - ln 2)] = 2 ln 2
K = 3, s = [ln 3, ln 2, 0, 0] (exp: 3, 2, 1, 1; sum 7):
    plain  = -(ln 3 - ln 7) = ln(7/3)
    ranked = -[(ln 3 - ln 7) + (ln 2 - ln 4) + (0 - ln 2)] = ln(7/3) + 2 ln 2 = ln(28/3)
K = 3 with column 3 masked out, s = [ln 3, ln 2, 0, *] (exp: 3, 2, 1; sum 6):
    plain  = -(ln 3 - ln 6) = ln 2
    ranked = -[(ln 3 - ln 6) + (ln 2 - ln 3) + 0] = ln 2 + ln(3/2) = ln 3
"""

import math

import pytest
import torch
from torch.testing import assert_close

from seqcpo.losses import cpo_loss, dpo_loss, mle_loss, preference_metrics

LN2, LN3 = math.log(2), math.log(3)


def _inputs(s, beta=0.5, seed=0):
    """policy/ref pairs whose rewards beta*(policy-ref) equal s exactly; ref is arbitrary."""
    s = torch.tensor([s], dtype=torch.float64)
    ref = torch.randn(s.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 10
    return (ref + s / beta).float(), ref.float(), beta


@pytest.mark.parametrize(
    "s, plain, ranked",
    [
        ([1.0, 0.0], math.log1p(math.exp(-1)), math.log1p(math.exp(-1))),
        ([LN2, 0.0, 0.0], LN2, 2 * LN2),
        ([LN3, LN2, 0.0, 0.0], math.log(7 / 3), math.log(28 / 3)),
    ],
)
def test_cpo_loss_hand_values(s, plain, ranked):
    pol, ref, beta = _inputs(s)
    assert_close(cpo_loss(pol, ref, beta), torch.tensor(plain), atol=1e-5, rtol=1e-5)
    assert_close(cpo_loss(pol, ref, beta, ranked=True), torch.tensor(ranked), atol=1e-5, rtol=1e-5)


def test_cpo_loss_masked_column():
    pol, ref, beta = _inputs([LN3, LN2, 0.0, 123.0])  # the masked column's value must not matter
    mask = torch.tensor([[True, True, True, False]])
    assert_close(cpo_loss(pol, ref, beta, mask=mask), torch.tensor(LN2), atol=1e-5, rtol=1e-5)
    assert_close(cpo_loss(pol, ref, beta, ranked=True, mask=mask), torch.tensor(LN3), atol=1e-5, rtol=1e-5)
    # and the masked column gets no gradient, with no NaN anywhere
    pol = pol.clone().requires_grad_(True)
    cpo_loss(pol, ref, beta, ranked=True, mask=mask).backward()
    assert torch.isfinite(pol.grad).all() and pol.grad[0, 3] == 0


def test_batch_mean():
    p1, r1, beta = _inputs([LN2, 0.0, 0.0])
    p2, r2, _ = _inputs([LN3, LN2, 0.0], seed=1)
    loss = cpo_loss(torch.cat([p1, p2]), torch.cat([r1, r2]), beta)
    # second row: -(ln3 - ln6) = ln 2, so the mean is ln 2
    assert_close(loss, torch.tensor(LN2), atol=1e-5, rtol=1e-5)


def test_k1_equals_dpo():
    g = torch.Generator().manual_seed(3)
    pol = torch.randn(16, 2, generator=g) * 20
    ref = torch.randn(16, 2, generator=g) * 20
    for ranked in (False, True):
        assert_close(
            cpo_loss(pol, ref, 0.1, ranked=ranked), dpo_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], 0.1)
        )


def test_bf16_inputs_are_stable():
    """Log-probs of hundreds of nats in bf16: the loss is finite and equals the fp32 loss of the same values."""
    pol = torch.tensor([[-310.0, -450.0, -700.0, -290.0]]).bfloat16()
    ref = torch.tensor([[-320.0, -440.0, -690.0, -300.0]]).bfloat16()
    for ranked in (False, True):
        out = cpo_loss(pol, ref, 5.0, ranked=ranked)
        assert out.dtype == torch.float32 and torch.isfinite(out)
        assert_close(out, cpo_loss(pol.float(), ref.float(), 5.0, ranked=ranked))


def test_ref_gets_no_gradient():
    pol = torch.randn(2, 3, requires_grad=True)
    ref = torch.randn(2, 3, requires_grad=True)
    cpo_loss(pol, ref, 0.1).backward()
    assert ref.grad is None and pol.grad is not None


def test_mle_and_combined():
    # two golds: 3 tokens with summed logp -6, 1 token with -2: token-mean NLL = 8 / 4 = 2
    mle = mle_loss(torch.tensor([-6.0, -2.0]), torch.tensor([3, 1]))
    assert_close(mle, torch.tensor(2.0))



def test_step_loss_hand_values_and_split_sum():
    """Step of 10 gold tokens and 4 examples over two micro-batches: NLL sums 12 and 8 (token mean 2.0), CPO sums
    1.0 and 3.0 (example mean 1.0); mle_weight 0.5, lambda 2: L = 0.5 * 2 + 2 * 1 = 3.0, the two shares adding to it."""
    from seqcpo.losses import step_loss

    kw = dict(tokens=10, examples=4, mle_weight=0.5, cpo_lambda=2.0)
    a = step_loss(torch.tensor(12.0), torch.tensor(1.0), **kw)  # 0.5 * 12 / 10 + 2 * 1 / 4 = 1.1
    b = step_loss(torch.tensor(8.0), torch.tensor(3.0), **kw)  # 0.5 * 8 / 10 + 2 * 3 / 4 = 1.9
    assert_close(a, torch.tensor(1.1))
    assert_close(b, torch.tensor(1.9))
    assert_close(a + b, torch.tensor(3.0))
    # MLE alone: the token mean; two processes: each share doubled (DDP averages the gradients back)
    assert_close(step_loss(torch.tensor(12.0), tokens=10, examples=4), torch.tensor(1.2))
    assert_close(step_loss(torch.tensor(12.0), tokens=10, examples=4, processes=2), torch.tensor(2.4))
    # an empty step divides by 1, never by 0
    assert_close(step_loss(torch.tensor(0.0), torch.tensor(0.0), tokens=0, examples=0), torch.tensor(0.0))
    # gradients flow into both sums with their weights
    nll, cpo = torch.tensor(4.0, requires_grad=True), torch.tensor(2.0, requires_grad=True)
    step_loss(nll, cpo, **kw).backward()
    assert_close(nll.grad, torch.tensor(0.05))
    assert_close(cpo.grad, torch.tensor(0.5))


def test_shape_errors():
    with pytest.raises(ValueError, match="same shape"):
        cpo_loss(torch.zeros(2, 3), torch.zeros(2, 4), 0.1)
    with pytest.raises(ValueError, match="K >= 1"):
        cpo_loss(torch.zeros(2, 1), torch.zeros(2, 1), 0.1)
    with pytest.raises(ValueError, match="gold column"):
        cpo_loss(torch.zeros(1, 3), torch.zeros(1, 3), 0.1, mask=torch.tensor([[False, True, True]]))


def test_metrics():
    # beta = 1, ref = 0: rewards = policy. Row 0: gold 2 > both (1, 3? no): [2, 1, 3]; row 1: [5, 0, 4]
    pol = torch.tensor([[2.0, 1.0, 3.0], [5.0, 0.0, 4.0]])
    m = preference_metrics(pol, torch.zeros_like(pol), 1.0)
    assert m["rewards/chosen"] == pytest.approx(3.5)
    assert m["rewards/rejected"] == pytest.approx(2.0)
    assert m["rewards/margins"] == pytest.approx(((2 - 2) + (5 - 2)) / 2)
    assert m["rewards/accuracies"] == pytest.approx(3 / 4)
    assert m["rewards/strongest_rejected"] == pytest.approx(3.5)
    assert m["rewards/gold_top1"] == pytest.approx(0.5)
    assert m["logps/chosen"] == pytest.approx(3.5)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    m = preference_metrics(pol, torch.zeros_like(pol), 1.0, mask=mask)
    assert m["rewards/gold_top1"] == pytest.approx(1.0)
    assert m["rewards/accuracies"] == pytest.approx(1.0)
