"""KTO loss checked against hand-computed ``math`` values."""

import math

import pytest
import torch

from alignctl.losses.kto import KTO_LOSS_TYPES, kto_loss

C, RC = [-10.0, -7.0, -12.0], [-11.0, -6.5, -12.0]  # desirable: policy / reference
R, RR = [-9.0, -14.0], [-10.0, -13.0]  # undesirable: policy / reference
# Mismatched-pair KL batch: mean(policy - ref) = (1 + 0.5 - 1 + 1) / 4 = 0.375
KL_P, KL_R = [-20.0, -18.0, -25.0, -19.0], [-21.0, -18.5, -24.0, -20.0]


def t(xs, grad=False):
    return torch.tensor(xs, dtype=torch.float64, requires_grad=grad)


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def kl_hand(p=KL_P, r=KL_R):
    return max(0.0, sum(a - b for a, b in zip(p, r)) / len(p))


def expected(beta, dw=1.0, uw=1.0, kl=None, c=C, rc=RC, r=R, rr=RR):
    z0 = kl_hand() if kl is None else kl
    des = [dw * (1 - sig(beta * ((a - b) - z0))) for a, b in zip(c, rc)]
    und = [uw * (1 - sig(beta * (z0 - (a - b)))) for a, b in zip(r, rr)]
    return des + und


def close(tensor, values, tol=1e-12):
    assert list(tensor.shape) == [len(values)]
    for got, want in zip(tensor.tolist(), values):
        assert got == pytest.approx(want, abs=tol)


def run(c=C, rc=RC, r=R, rr=RR, kp=KL_P, kr=KL_R, **kw):
    return kto_loss(t(c), t(r), t(rc), t(rr), t(kp), t(kr), **kw)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_kto_matches_hand_formula(beta):
    out = run(beta=beta)
    assert kl_hand() == pytest.approx(0.375)
    assert out.kl.item() == pytest.approx(0.375, abs=1e-12)
    close(out.losses, expected(beta))
    close(out.chosen_rewards, [beta * (a - b) for a, b in zip(C, RC)])
    close(out.rejected_rewards, [beta * (a - b) for a, b in zip(R, RR)])


def test_literal_anchor():
    # logratio 2, KL 0, beta 0.5: 1 - sigmoid(1)
    out = kto_loss(t([-1.0]), t([]), t([-3.0]), t([]), t([-5.0]), t([-5.0]), beta=0.5)
    assert out.losses.item() == pytest.approx(0.2689414213699951, abs=1e-12)


@pytest.mark.parametrize("dw,uw", [(1.0, 1.0), (1.33, 0.5), (0.0, 2.0)])
def test_desirable_undesirable_weights(dw, uw):
    out = run(beta=0.1, desirable_weight=dw, undesirable_weight=uw)
    close(out.losses, expected(0.1, dw=dw, uw=uw))


def test_kl_is_clamped_at_zero():
    kp = [a - 5.0 for a in KL_R]  # policy below reference: negative raw KL
    out = run(kp=kp, beta=0.1)
    assert out.kl.item() == 0.0
    close(out.losses, expected(0.1, kl=0.0))


def test_kl_is_detached():
    kp = t(KL_P, grad=True)
    c = t(C, grad=True)
    out = kto_loss(c, t(R), t(RC), t(RR), kp, t(KL_R), beta=0.1)
    assert not out.kl.requires_grad
    out.losses.sum().backward()
    assert kp.grad is None  # no gradient flows into the KL batch
    assert c.grad is not None
    # d/dc [1 - sigma(beta (c - rc - z0))] = -beta * s * (1 - s): z0 treated as a constant
    want = []
    for a, b in zip(C, RC):
        s = sig(0.1 * ((a - b) - 0.375))
        want.append(-0.1 * s * (1 - s))
    close(c.grad, want)


def test_kl_reduce_is_applied_before_clamp():
    seen = []

    def fake_gather_mean(kl):  # e.g. all-gather over 2 ranks, the other rank reporting -3.0
        seen.append(kl.item())
        return torch.stack([kl, torch.tensor(-3.0, dtype=kl.dtype)])

    out = run(beta=0.1, kl_reduce=fake_gather_mean)
    assert seen == [pytest.approx(0.375)]
    assert out.kl.item() == 0.0  # mean(0.375, -3.0) < 0 -> clamped
    close(out.losses, expected(0.1, kl=0.0))

    out = run(beta=0.1, kl_reduce=lambda kl: torch.stack([kl, torch.tensor(1.625, dtype=kl.dtype)]))
    assert out.kl.item() == pytest.approx(1.0)
    close(out.losses, expected(0.1, kl=1.0))


def test_empty_undesirable_half():
    out = run(r=[], rr=[], beta=0.1)
    assert out.losses.shape == (3,)
    assert out.rejected_rewards.shape == (0,)
    close(out.losses, expected(0.1, r=[], rr=[]))


def test_empty_desirable_half():
    out = run(c=[], rc=[], beta=0.5, undesirable_weight=1.5)
    assert out.chosen_rewards.shape == (0,)
    close(out.losses, expected(0.5, uw=1.5, c=[], rc=[]))


def test_both_halves_empty():
    out = run(c=[], rc=[], r=[], rr=[], beta=0.1)
    assert out.losses.shape == (0,)
    assert out.kl.item() == pytest.approx(0.375)


def test_apo_zero_unpaired_uses_no_kl():
    beta = 0.5
    out = kto_loss(t(C), t(R), t(RC), t(RR), beta=beta, loss_type="apo_zero_unpaired")
    assert out.kl.item() == 0.0
    des = [1 - sig(beta * (a - b)) for a, b in zip(C, RC)]
    und = [sig(beta * (a - b)) for a, b in zip(R, RR)]
    close(out.losses, des + und)


def test_kto_requires_kl_batch():
    with pytest.raises(ValueError, match="policy_kl_logps"):
        kto_loss(t(C), t(R), t(RC), t(RR), beta=0.1)


def test_unknown_loss_type():
    with pytest.raises(ValueError) as err:
        run(loss_type="kto_pair")
    for name in KTO_LOSS_TYPES:
        assert name in str(err.value)
