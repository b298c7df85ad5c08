"""CPO / SimPO and ORPO losses checked against hand-computed ``math`` values."""

import math

import pytest
import torch

from alignctl.losses.cpo import CPO_LOSS_TYPES, cpo_loss
from alignctl.losses.orpo import odds_ratio_loss, orpo_total_loss

# Log-probs (summed for sigmoid/hinge, averaged per token for ipo/simpo; the math is the same).
C = [-0.8, -1.6, -0.3]
R = [-1.2, -1.1, -2.5]
NLL = 1.7


def t(xs, grad=False):
    return torch.tensor(xs, dtype=torch.float64, requires_grad=grad)


def logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def close(tensor, values, tol=1e-12):
    assert list(tensor.shape) == [len(values)]
    for got, want in zip(tensor.tolist(), values):
        assert got == pytest.approx(want, abs=tol)


def alphapo(logp, alpha):
    """AlphaPO reward (1 - p^-alpha) / alpha of p = exp(logp), by hand."""
    return (1 - math.exp(logp) ** -alpha) / alpha


def cpo_expected(loss_type, beta, eps=0.0, gamma=0.5, alpha=0.0):
    out = []
    for c, r in zip(C, R):
        z = c - r if alpha == 0 else alphapo(c, alpha) - alphapo(r, alpha)
        if loss_type == "simpo":
            u = beta * z - gamma  # beta * (z - gamma / beta)
            out.append(-(1 - eps) * logsig(u) - eps * logsig(-u))
        elif loss_type == "sigmoid":
            out.append(-(1 - eps) * logsig(beta * z) - eps * logsig(-beta * z))
        elif loss_type == "hinge":
            out.append(max(0.0, 1 - beta * z))
        else:
            out.append((z - 1 / (2 * beta)) ** 2)
    return out


# ----------------------------------------------------------------------------- CPO


@pytest.mark.parametrize("beta", [0.1, 2.0])
@pytest.mark.parametrize("loss_type", CPO_LOSS_TYPES)
def test_cpo_every_loss_type(loss_type, beta):
    out = cpo_loss(t(C), t(R), t(NLL), beta=beta, loss_type=loss_type, cpo_alpha=1.0)
    want = cpo_expected(loss_type, beta)
    close(out.losses, want)
    assert out.loss.item() == pytest.approx(sum(want) / 3 + NLL, abs=1e-12)
    close(out.chosen_rewards, [beta * c for c in C])
    close(out.rejected_rewards, [beta * r for r in R])
    assert not out.chosen_rewards.requires_grad


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo"])
def test_cpo_label_smoothing(loss_type):
    out = cpo_loss(t(C), t(R), t(NLL), beta=2.0, loss_type=loss_type, label_smoothing=0.2)
    close(out.losses, cpo_expected(loss_type, 2.0, eps=0.2))


@pytest.mark.parametrize("gamma", [0.5, 1.4])
def test_simpo_gamma(gamma):
    out = cpo_loss(t(C), t(R), t(NLL), beta=2.0, loss_type="simpo", simpo_gamma=gamma, cpo_alpha=0.0)
    want = cpo_expected("simpo", 2.0, gamma=gamma)
    close(out.losses, want)
    # cpo_alpha = 0: pure SimPO, the NLL is dropped.
    assert out.nll_loss.item() == 0.0
    assert out.loss.item() == pytest.approx(sum(want) / 3, abs=1e-12)


def test_simpo_literal_anchor():
    # beta=2, avg logps -1 vs -2, gamma=0.5: -log sigmoid(2*1 - 0.5) = log(1 + e^-1.5)
    out = cpo_loss(t([-1.0]), t([-2.0]), t(0.0), beta=2.0, loss_type="simpo", simpo_gamma=0.5)
    assert out.losses.item() == pytest.approx(0.20141327798275246, abs=1e-12)


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_cpo_alpha_weights_nll(alpha):
    out = cpo_loss(t(C), t(R), t(NLL), beta=0.1, cpo_alpha=alpha)
    assert out.nll_loss.item() == pytest.approx(NLL)
    assert out.loss.item() == pytest.approx(sum(cpo_expected("sigmoid", 0.1)) / 3 + alpha * NLL, abs=1e-12)


@pytest.mark.parametrize("alpha", [0.25, -0.5])
@pytest.mark.parametrize("loss_type", CPO_LOSS_TYPES)
def test_alphapo_reshapes_the_rewards_of_every_loss_type(loss_type, alpha):
    beta = 2.0
    out = cpo_loss(t(C), t(R), t(NLL), beta=beta, loss_type=loss_type, cpo_alpha=0.0, alpha=alpha)
    close(out.losses, cpo_expected(loss_type, beta, alpha=alpha))
    close(out.chosen_rewards, [beta * alphapo(c, alpha) for c in C])
    close(out.rejected_rewards, [beta * alphapo(r, alpha) for r in R])


def test_alphapo_alpha_zero_is_the_base_loss_and_small_alpha_tends_to_it():
    base = cpo_loss(t(C), t(R), t(NLL), beta=0.1, loss_type="simpo")
    assert torch.equal(cpo_loss(t(C), t(R), t(NLL), beta=0.1, loss_type="simpo", alpha=0.0).losses, base.losses)
    near = cpo_loss(t(C), t(R), t(NLL), beta=0.1, loss_type="simpo", alpha=1e-7)
    close(near.losses, base.losses.tolist(), tol=1e-6)  # (1 - p^-a)/a -> log p as a -> 0


def test_cpo_gradient_reaches_nll_and_logps():
    c, nll = t(C, grad=True), t(NLL, grad=True)
    cpo_loss(c, t(R), nll, beta=0.1, cpo_alpha=0.3).loss.backward()
    assert nll.grad.item() == pytest.approx(0.3)
    # d/dc_i mean(-log sigma(beta z_i)) = -beta * sigma(-beta z_i) / B
    close(c.grad, [-0.1 / (1 + math.exp(0.1 * (a - b))) / 3 for a, b in zip(C, R)])


def test_cpo_unknown_loss_type():
    with pytest.raises(ValueError) as err:
        cpo_loss(t(C), t(R), t(NLL), loss_type="bco_pair")
    for name in CPO_LOSS_TYPES:
        assert name in str(err.value)


# ----------------------------------------------------------------------------- ORPO


def log_odds(lp):
    p = math.exp(lp)
    return math.log(p / (1 - p))


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_odds_ratio(beta):
    out = odds_ratio_loss(t(C), t(R), beta=beta)
    lor = [log_odds(c) - log_odds(r) for c, r in zip(C, R)]
    ratio = [logsig(x) for x in lor]
    close(out.losses, [beta * x for x in ratio])
    assert all(x <= 0 for x in out.losses.tolist())  # TRL sign: a log-probability, not a loss
    close(out.chosen_rewards, [beta * c for c in C])
    close(out.rejected_rewards, [beta * r for r in R])
    assert out.log_odds_ratio.item() == pytest.approx(sum(ratio) / 3, abs=1e-12)
    assert out.log_odds_chosen.item() == pytest.approx(sum(lor) / 3, abs=1e-12)


def test_orpo_literal_anchor():
    # p_c = p_r: odds ratio 1 -> log sigmoid(0) = -log 2
    out = odds_ratio_loss(t([math.log(0.3)]), t([math.log(0.3)]), beta=1.0)
    assert out.losses.item() == pytest.approx(-math.log(2), abs=1e-12)
    # p_c = 0.5 (odds 1), p_r = 0.2 (odds 1/4): log sigmoid(log 4) = log(4/5)
    out = odds_ratio_loss(t([math.log(0.5)]), t([math.log(0.2)]), beta=0.1)
    assert out.losses.item() == pytest.approx(0.1 * math.log(0.8), abs=1e-12)
    assert out.log_odds_chosen.item() == pytest.approx(math.log(4), abs=1e-12)


def test_orpo_total_is_nll_minus_mean_term():
    out = odds_ratio_loss(t(C), t(R), beta=0.1)
    ratio = [logsig(log_odds(c) - log_odds(r)) for c, r in zip(C, R)]
    total = orpo_total_loss(t(NLL), out.losses)
    assert total.item() == pytest.approx(NLL - 0.1 * sum(ratio) / 3, abs=1e-12)


def test_orpo_gradient_pushes_chosen_up():
    c = t(C, grad=True)
    orpo_total_loss(t(NLL), odds_ratio_loss(c, t(R), beta=0.1).losses).backward()
    assert (c.grad < 0).all()  # lowering the loss raises the chosen log-prob
