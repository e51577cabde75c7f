"""The list losses (LiPO-lambda, all-pairs Bradley-Terry, InfoNCA, NCA) and the target margin, against numbers
derived by hand from their equations, their K = 1 reductions, ties and masked columns."""

import math

import pytest
import torch

from seqcpo.losses import (
    bt_pairs_loss_per_example,
    cpo_loss_per_example,
    dpo_loss,
    infonca_loss_per_example,
    lipo_lambda_weights,
    lipo_loss_per_example,
    nca_loss_per_example,
    preference_loss_per_example,
)

NEG_INF = float("-inf")


def sp(x):  # -log sigmoid(x) = softplus(-x)
    return math.log1p(math.exp(-x))


def logsig(x):
    return -sp(x)


# rewards s = [1, 0, -1] (beta 1, reference 0): gold best, then the two negatives
POL = torch.tensor([[1.0, 0.0, -1.0]])
REF = torch.zeros(1, 3)
LABELS = torch.tensor([[0.0, -1.0, -2.0]])


def test_bt_pairs_by_hand_with_ties():
    # pairs (0,1), (0,2), (1,2): differences 1, 2, 1
    want = (sp(1) + sp(2) + sp(1)) / 3
    assert bt_pairs_loss_per_example(POL, REF, 1.0, LABELS).item() == pytest.approx(want, rel=1e-6)
    # the two negatives tied: only the gold's two pairs remain
    tied = torch.tensor([[0.0, -1.0, -1.0]])
    assert bt_pairs_loss_per_example(POL, REF, 1.0, tied).item() == pytest.approx((sp(1) + sp(2)) / 2, rel=1e-6)


def test_lipo_lambda_weights_and_loss_by_hand():
    # grades psi = [2, 1, 0] -> gains G = 2^psi - 1 = [3, 1, 0]; positions by reward tau = [1, 2, 3];
    # 1/D(tau) = 1/log2(1 + tau) = [1, 1/log2(3), 1/2]
    inv = [1.0, 1 / math.log2(3), 0.5]
    d01, d02, d12 = 2 * (inv[0] - inv[1]), 3 * (inv[0] - inv[2]), 1 * (inv[1] - inv[2])
    w = lipo_lambda_weights(POL, LABELS, torch.ones(1, 3, dtype=torch.bool))
    assert w[0, 0, 1].item() == pytest.approx(d01) and w[0, 0, 2].item() == pytest.approx(d02)
    assert w[0, 1, 2].item() == pytest.approx(d12) and w[0, 1, 0].item() == 0.0
    want = (d01 * sp(1) + d02 * sp(2) + d12 * sp(1)) / (d01 + d02 + d12)
    assert lipo_loss_per_example(POL, REF, 1.0, LABELS).item() == pytest.approx(want, rel=1e-6)


def test_lipo_positions_follow_the_rewards_not_the_columns():
    # the model ranks negative 2 above negative 1: tau = [1, 3, 2]
    pol = torch.tensor([[1.0, -1.0, 0.0]])
    w = lipo_lambda_weights(pol, LABELS, torch.ones(1, 3, dtype=torch.bool))
    inv = [1.0, 0.5, 1 / math.log2(3)]
    assert w[0, 1, 2].item() == pytest.approx(1 * abs(inv[1] - inv[2]))


def test_infonca_and_nca_by_hand():
    targets = torch.tensor([[2.0, 0.0, NEG_INF]])  # the data scores the gold 2, negative 1 0, negative 2 none
    p0, p1 = math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)
    lse = math.log(math.e + 1 + math.exp(-1))
    want_info = -(p0 * (1 - lse) + p1 * (0 - lse))
    assert infonca_loss_per_example(POL, REF, 1.0, targets).item() == pytest.approx(want_info, rel=1e-6)
    want_nca = -(p0 * logsig(1) + p1 * logsig(0)) - (logsig(-1) + logsig(0) + logsig(1)) / 3
    assert nca_loss_per_example(POL, REF, 1.0, targets).item() == pytest.approx(want_nca, rel=1e-6)
    # alpha sharpens the targets: alpha -> 0 is one-hot on the gold, the CPO softmax loss
    sharp = infonca_loss_per_example(POL, REF, 1.0, targets, alpha=1e-3)
    assert sharp.item() == pytest.approx(cpo_loss_per_example(POL, REF, 1.0).item(), rel=1e-5)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_k1_reductions(beta):
    g = torch.Generator().manual_seed(0)
    pol, ref = torch.randn(6, 2, generator=g) * 3, torch.randn(6, 2, generator=g) * 3
    dpo = dpo_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], beta)
    labels = torch.tensor([[0.0, -1.0]] * 6)
    one_hot = torch.tensor([[0.0, NEG_INF]] * 6)
    for name, got in [
        ("bt_pairs", bt_pairs_loss_per_example(pol, ref, beta, labels)),
        ("lipo", lipo_loss_per_example(pol, ref, beta, labels)),
        ("infonca", infonca_loss_per_example(pol, ref, beta, one_hot)),
        ("cpo_ranked", cpo_loss_per_example(pol, ref, beta, ranked=True)),
    ]:
        assert got.mean().item() == pytest.approx(dpo.item(), rel=1e-5), name
    # NCA does not reduce to DPO: with K = 1 it is TRL's "nca_pair" loss
    s = beta * (pol - ref)
    nca_pair = -torch.nn.functional.logsigmoid(s[:, 0]) - 0.5 * torch.nn.functional.logsigmoid(-s[:, 0]) \
        - 0.5 * torch.nn.functional.logsigmoid(-s[:, 1])
    assert torch.allclose(nca_loss_per_example(pol, ref, beta, one_hot), nca_pair, atol=1e-6)


def test_masked_columns_take_no_part():
    pol = torch.tensor([[1.0, 0.0, 5.0]])
    mask = torch.tensor([[True, True, False]])
    two = (pol[:, :2], REF[:, :2])
    labels2, targets = LABELS[:, :2], torch.tensor([[1.0, 0.0, 0.5]])
    for fn, extra, extra2 in [
        (bt_pairs_loss_per_example, LABELS, labels2),
        (lipo_loss_per_example, LABELS, labels2),
        (infonca_loss_per_example, targets, targets[:, :2]),
        (nca_loss_per_example, targets, targets[:, :2]),
    ]:
        got = fn(pol, REF, 1.0, extra, mask=mask)
        want = fn(*two, 1.0, extra2)
        assert got.item() == pytest.approx(want.item(), rel=1e-6), fn.__name__


def test_target_margin_is_simpo_at_k1():
    # reference-free: rewards are beta * length-normalised log-probs, the gold's reduced by gamma
    avg = torch.tensor([[-1.2, -1.5]])
    beta, gamma = 2.0, 0.5
    want = sp(beta * (-1.2) - beta * (-1.5) - gamma)
    got = cpo_loss_per_example(avg, torch.zeros_like(avg), beta, margin=gamma)
    assert got.item() == pytest.approx(want, rel=1e-6)
    via = preference_loss_per_example("dpo", avg, torch.zeros_like(avg), beta, margin=gamma)
    assert via.item() == pytest.approx(want, rel=1e-6)


def test_gradients_are_finite_and_list_losses_need_their_inputs():
    pol = POL.clone().requires_grad_(True)
    for name in ("lipo", "bt_pairs"):
        loss = preference_loss_per_example(name, pol, REF, 1.0, labels=LABELS).sum()
        (g,) = torch.autograd.grad(loss, pol)
        assert torch.isfinite(g).all() and g[0, 0] < 0  # raising the gold lowers the loss
    with pytest.raises(ValueError, match="needs targets"):
        preference_loss_per_example("nca", POL, REF, 1.0, labels=LABELS)
    with pytest.raises(ValueError, match="gold"):
        infonca_loss_per_example(POL, REF, 1.0, torch.tensor([[NEG_INF, 0.0, 0.0]]))


def test_gold_likelihood_monitor_warns_once_and_logs_the_delta(caplog):
    from types import SimpleNamespace

    from seqcpo.training.gold_watch import GoldLikelihoodMonitor, gold_drop

    mon = GoldLikelihoodMonitor(window=2, max_drop=5.0)
    state = SimpleNamespace(log_history=[], global_step=0, is_world_process_zero=True)
    values = [-50.0, -50.0, -53.0, -59.0, -70.0]
    with caplog.at_level("WARNING", logger="seqcpo"):
        for step, v in enumerate(values, start=1):
            state.global_step = step
            logs = {"loss": 1.0, "logps/chosen": v}
            state.log_history.append(dict(logs, step=step))
            mon.on_log(None, state, None, logs=logs)
    # start = mean(-50, -50); windows: -50, -51.5, -56, -64.5
    assert [h.get("logps/chosen_delta") for h in state.log_history] == [None, 0.0, -1.5, -6.0, -14.5]
    warnings = [r for r in caplog.records if "gold's own log-probability is falling" in r.getMessage()]
    assert len(warnings) == 1 and mon.reported == 4
    assert gold_drop(state.log_history, 2, 5.0) == 4
