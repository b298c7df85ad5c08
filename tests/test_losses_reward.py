"""Pairwise reward-model loss checked against hand-computed ``math`` values."""

import math

import pytest
import torch

from alignctl.losses.reward import reward_accuracy, reward_loss

RC = [1.5, -0.2, 0.3, 2.0]
RJ = [0.5, 0.4, 0.3, -1.0]
MARGIN = [0.25, 1.0, 0.0, 2.5]


def t(xs, grad=False):
    return torch.tensor(xs, dtype=torch.float64, requires_grad=grad)


def nls(x):
    """-log sigmoid(x) = log(1 + exp(-x))."""
    return math.log1p(math.exp(-x))


def mean(xs):
    return sum(xs) / len(xs)


def test_plain_pairwise_loss():
    want = mean([nls(a - b) for a, b in zip(RC, RJ)])
    assert reward_loss(t(RC), t(RJ)).item() == pytest.approx(want, abs=1e-12)


def test_literal_anchors():
    assert reward_loss(t([0.0]), t([0.0])).item() == pytest.approx(math.log(2), abs=1e-12)
    assert reward_loss(t([1.0]), t([0.0])).item() == pytest.approx(0.31326168751822286, abs=1e-12)


def test_margin_is_applied_per_pair():
    want = mean([nls(a - b - m) for a, b, m in zip(RC, RJ, MARGIN)])
    assert reward_loss(t(RC), t(RJ), margin=t(MARGIN)).item() == pytest.approx(want, abs=1e-12)


def test_scalar_head_shapes_do_not_broadcast():
    col = lambda xs: t(xs).unsqueeze(1)  # noqa: E731  ([B, 1] like a reward head's logits)
    want = mean([nls(a - b - m) for a, b, m in zip(RC, RJ, MARGIN)])
    assert reward_loss(col(RC), col(RJ), margin=t(MARGIN)).item() == pytest.approx(want, abs=1e-12)
    assert reward_loss(col(RC), col(RJ), margin=col(MARGIN)).item() == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("coef", [0.01, 0.5])
def test_center_rewards_term(coef):
    base = mean([nls(a - b - m) for a, b, m in zip(RC, RJ, MARGIN)])
    center = mean([(a + b) ** 2 for a, b in zip(RC, RJ)])
    got = reward_loss(t(RC), t(RJ), margin=t(MARGIN), center_rewards_coefficient=coef)
    assert got.item() == pytest.approx(base + coef * center, abs=1e-12)


def test_center_none_and_zero_agree():
    a = reward_loss(t(RC), t(RJ), center_rewards_coefficient=None)
    b = reward_loss(t(RC), t(RJ), center_rewards_coefficient=0.0)
    assert a.item() == pytest.approx(b.item(), abs=1e-15)


def test_gradient_matches_hand_derivative():
    rc = t(RC, grad=True)
    reward_loss(rc, t(RJ)).backward()
    # d/d rc_i of mean(-log sigma(rc_i - rj_i)) = -sigma(rj_i - rc_i) / B
    for g, a, b in zip(rc.grad.tolist(), RC, RJ):
        assert g == pytest.approx(-1.0 / (1.0 + math.exp(a - b)) / len(RC), abs=1e-12)


def test_accuracy_per_pair_ties_count_as_wrong():
    acc = reward_accuracy(t(RC), t(RJ))
    assert acc.tolist() == [1.0, 0.0, 0.0, 1.0]  # third pair is a tie: no preference, so wrong
    assert acc.mean().item() == pytest.approx(0.5)
    assert reward_accuracy(t(RC).unsqueeze(1), t(RJ).unsqueeze(1)).shape == (4,)
