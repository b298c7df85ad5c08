"""GRPO / RLOO math (losses/grpo.py, rl/advantages.py) checked against values worked out by hand.

Every expected number is computed here from the formulas with plain Python floats (``math``),
never by calling the code under test.
"""

import math

import pytest
import torch

from alignctl.losses.grpo import (
    GRPO_LOSS_TYPES,
    GRPOLossOutput,
    RLOOLossOutput,
    grpo_loss,
    rloo_loss,
)
from alignctl.rl.advantages import group_advantages, normalize_scores, rloo_advantages


def t(xs, dtype=torch.float64, grad=False):
    return torch.tensor(xs, dtype=dtype, requires_grad=grad)


def close(actual, expected, tol=1e-9):
    """Elementwise comparison of a tensor with a (nested) list of Python floats / a float."""
    exp = torch.tensor(expected, dtype=torch.float64)
    if isinstance(actual, torch.Tensor):
        act = actual.detach().to(torch.float64)
    else:
        act = torch.tensor(actual, dtype=torch.float64)
    assert act.shape == exp.shape, (act.shape, exp.shape)
    assert torch.allclose(act, exp, atol=tol, rtol=tol), (act, exp)


def mean_(xs):
    return sum(xs) / len(xs)


def std_(xs):
    """Unbiased (Bessel) standard deviation."""
    mu = mean_(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


EPS = 1e-4

# --------------------------------------------------------------------------- group advantages

# Two prompts, three completions each: rows 0-2 are prompt 0, rows 3-5 prompt 1.
# Prompt 0: mean 3, deviations (-2, -1, 3), sum of squares 14, var 14/2 = 7.
# Prompt 1: mean 1, deviations (-1, -1, 2), sum of squares 6,  var 6/2 = 3.
REWARDS = [1.0, 2.0, 6.0, 0.0, 0.0, 3.0]
DEVS = [-2.0, -1.0, 3.0, -1.0, -1.0, 2.0]
GROUP_STD = [math.sqrt(7)] * 3 + [math.sqrt(3)] * 3
# Whole batch: mean 2, deviations (-1, 0, 4, -2, -2, 1), SS 26, var 26/5.
BATCH_STD = math.sqrt(26 / 5)


def test_group_scale_two_groups_of_three():
    adv, std, zero = group_advantages(t(REWARDS), 3, scale="group")
    close(adv, [d / (s + EPS) for d, s in zip(DEVS, GROUP_STD)])
    close(adv, [-2 / (math.sqrt(7) + EPS), -1 / (math.sqrt(7) + EPS), 3 / (math.sqrt(7) + EPS),
                -1 / (math.sqrt(3) + EPS), -1 / (math.sqrt(3) + EPS), 2 / (math.sqrt(3) + EPS)])
    close(std, GROUP_STD)
    assert zero.dtype == torch.bool and not zero.any()
    assert adv.dtype == torch.float64


def test_batch_scale_uses_group_mean_and_batch_std():
    adv, std, zero = group_advantages(t(REWARDS), 3, scale="batch")
    assert abs(BATCH_STD - math.sqrt(5.2)) < 1e-12
    close(adv, [d / (BATCH_STD + EPS) for d in DEVS])
    close(std, [BATCH_STD] * 6)
    assert not zero.any()


def test_none_scale_is_mean_centering_only_but_reports_group_std():
    adv, std, zero = group_advantages(t(REWARDS), 3, scale="none")
    close(adv, DEVS)
    close(std, GROUP_STD)
    assert not zero.any()


def test_equal_rewards_group_has_zero_advantage_and_zero_std():
    # Prompt 0: all 2 -> std 0, advantage 0 / (0 + eps) = 0. Prompt 1: (0, 1, 2): mean 1, std 1.
    adv, std, zero = group_advantages(t([2.0, 2.0, 2.0, 0.0, 1.0, 2.0]), 3)
    close(adv, [0.0, 0.0, 0.0, -1 / (1 + EPS), 0.0, 1 / (1 + EPS)])
    close(std, [0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    assert zero.tolist() == [True, True, True, False, False, False]
    assert zero.float().mean().item() == 0.5  # frac_reward_zero_std

    # With "batch" the flag follows the (non-zero) batch std, as in TRL; advantages stay 0.
    adv_b, std_b, zero_b = group_advantages(t([2.0, 2.0, 2.0, 0.0, 1.0, 2.0]), 3, scale="batch")
    # batch mean 1.5, deviations (.5,.5,.5,-1.5,-.5,.5): SS = 0.75 + 2.25 + 0.25 + 0.25 = 3.5
    s = math.sqrt(3.5 / 5)
    close(adv_b, [0.0, 0.0, 0.0, -1 / (s + EPS), 0.0, 1 / (s + EPS)])
    close(std_b, [s] * 6)
    assert not zero_b.any()


def test_group_of_two():
    # (0, 1): mean 0.5, unbiased var (0.25 + 0.25) / 1 = 0.5. (4, 4): std 0.
    adv, std, zero = group_advantages(t([0.0, 1.0, 4.0, 4.0]), 2)
    s = math.sqrt(0.5)
    close(adv, [-0.5 / (s + EPS), 0.5 / (s + EPS), 0.0, 0.0])
    close(std, [s, s, 0.0, 0.0])
    assert zero.tolist() == [False, False, True, True]


def test_eps_effect():
    # (0, 2): mean 1, std sqrt(2).
    adv0, _, _ = group_advantages(t([0.0, 2.0]), 2, eps=0.0)
    close(adv0, [-1 / math.sqrt(2), 1 / math.sqrt(2)])
    adv1, _, _ = group_advantages(t([0.0, 2.0]), 2, eps=1.0)
    close(adv1, [-1 / (math.sqrt(2) + 1), 1 / (math.sqrt(2) + 1)])
    advd, _, _ = group_advantages(t([0.0, 2.0]), 2)
    close(advd, [-1 / (math.sqrt(2) + 1e-4), 1 / (math.sqrt(2) + 1e-4)])
    # eps is irrelevant without scaling
    advn, _, _ = group_advantages(t([0.0, 2.0]), 2, scale="none", eps=1.0)
    close(advn, [-1.0, 1.0])


def test_group_advantages_int_rewards_promoted_and_float32():
    adv, std, _ = group_advantages(torch.tensor([0, 2]), 2, scale="none")
    assert adv.dtype == torch.float32
    close(adv, [-1.0, 1.0], tol=1e-6)
    adv32, _, _ = group_advantages(torch.tensor([0.0, 2.0]), 2)
    assert adv32.dtype == torch.float32
    close(adv32, [-1 / (math.sqrt(2) + EPS), 1 / (math.sqrt(2) + EPS)], tol=1e-6)


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        group_advantages(t([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="multiple"):
        group_advantages(t([1.0, 2.0, 3.0]), 2)
    with pytest.raises(ValueError, match="group, batch, none"):
        group_advantages(t([1.0, 2.0]), 2, scale="std")


# --------------------------------------------------------------------------- RLOO advantages


def hand_rloo(scores, kl_sum, k, kl_coef):
    r = [s - kl_coef * kl for s, kl in zip(scores, kl_sum)]
    adv = []
    for p in range(len(r) // k):
        grp = r[p * k:(p + 1) * k]
        for i in range(k):
            others = [grp[j] for j in range(k) if j != i]
            adv.append(grp[i] - sum(others) / (k - 1))
    return adv, r


def test_rloo_k2_with_kl():
    # R = score - 0.1 * kl_sum = (0.95, 2.9, -0.2, 4.0); with k = 2 the baseline is the other one.
    adv, rr = rloo_advantages(t([1.0, 3.0, 0.0, 4.0]), t([0.5, 1.0, 2.0, 0.0]), 2, 0.1)
    close(rr, [0.95, 2.9, -0.2, 4.0])
    close(adv, [0.95 - 2.9, 2.9 - 0.95, -0.2 - 4.0, 4.0 + 0.2])
    close(adv, [-1.95, 1.95, -4.2, 4.2])


def test_rloo_k3_no_kl():
    # prompt 0 (1, 2, 6): baselines (2+6)/2=4, (1+6)/2=3.5, (1+2)/2=1.5
    # prompt 1 (3, 3, 0): baselines 1.5, 1.5, 3
    adv, rr = rloo_advantages(t([1.0, 2.0, 6.0, 3.0, 3.0, 0.0]), t([9.0] * 6), 3, 0.0)
    close(adv, [1 - 4, 2 - 3.5, 6 - 1.5, 3 - 1.5, 3 - 1.5, 0 - 3])
    close(rr, [1.0, 2.0, 6.0, 3.0, 3.0, 0.0])


def test_rloo_k3_with_kl_and_normalize():
    scores = [1.0, 2.0, 6.0, 3.0, 3.0, 0.0]
    kl_sum = [0.2, -0.4, 1.0, 3.0, 0.0, -2.0]
    kl_coef = 0.5
    exp_adv, exp_r = hand_rloo(scores, kl_sum, 3, kl_coef)
    # spot check: R = (0.9, 2.2, 5.5, 1.5, 3.0, 1.0); A_0 = 0.9 - (2.2 + 5.5) / 2 = -2.95
    close(exp_r, [0.9, 2.2, 5.5, 1.5, 3.0, 1.0])
    assert abs(exp_adv[0] + 2.95) < 1e-12
    adv, rr = rloo_advantages(t(scores), t(kl_sum), 3, kl_coef)
    close(rr, exp_r)
    close(adv, exp_adv)

    adv_n, rr_n = rloo_advantages(t(scores), t(kl_sum), 3, kl_coef, normalize_advantage=True)
    mu, sd = mean_(exp_adv), std_(exp_adv)
    close(adv_n, [(a - mu) / (sd + 1e-8) for a in exp_adv])
    close(rr_n, exp_r)


def test_rloo_advantages_errors():
    with pytest.raises(ValueError, match="k must be >= 2"):
        rloo_advantages(t([1.0, 2.0]), t([0.0, 0.0]), 1, 0.1)
    with pytest.raises(ValueError, match="multiple"):
        rloo_advantages(t([1.0, 2.0, 3.0]), t([0.0, 0.0, 0.0]), 2, 0.1)
    with pytest.raises(ValueError):
        rloo_advantages(t([1.0, 2.0]), t([0.0, 0.0, 0.0]), 2, 0.1)


def test_normalize_scores_with_clipping():
    s = [0.0, 1.0, 2.0, 10.0]
    # mean 3.25, deviations (-3.25, -2.25, -1.25, 6.75), SS 62.75, unbiased var 62.75 / 3
    sd = math.sqrt(62.75 / 3)
    z = [(x - 3.25) / (sd + 1e-8) for x in s]
    assert z[3] > 1.0 and z[0] < -0.5 and -0.5 < z[1] < 0
    close(normalize_scores(t(s), 10.0), z)
    close(normalize_scores(t(s), 1.0), [z[0], z[1], z[2], 1.0])
    close(normalize_scores(t(s), 0.5), [-0.5, z[1], z[2], 0.5])  # z[1] ~ -0.492
    with pytest.raises(ValueError):
        normalize_scores(t([1.0]), 1.0)


# --------------------------------------------------------------------------- GRPO loss

# Two completions: row 0 has 3 tokens, row 1 has 1 token (2 padding positions).
# old log-probs are 0, so ratio = exp(logprobs).  eps_low = 0.2, eps_high = 0.28.
# Row 0, A = +1: ratios 1.5 (clipped to 1.28 -> -1.28), 0.5 (min(0.5, 0.8) = 0.5 -> -0.5),
#                1.1 (inside -> -1.1).
# Row 1, A = -2: ratio 0.7, clamp 0.8: min(-1.4, -1.6) = -1.6 -> loss +1.6 (clipped low).
#                padding ratios 3.0 must be ignored everywhere.
MASK = [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]
RATIOS = [[1.5, 0.5, 1.1], [0.7, 3.0, 3.0]]
ADV = [1.0, -2.0]
TOK = [[-1.28, -0.5, -1.1], [1.6]]


def base_inputs(grad=True):
    lp = t([[math.log(r) for r in row] for row in RATIOS], grad=grad)
    old = torch.zeros(2, 3, dtype=torch.float64)
    return lp, old, t(ADV), t(MASK)


def run_grpo(loss_type, **kw):
    lp, old, adv, mask = base_inputs()
    kw.setdefault("epsilon_low", 0.2)
    kw.setdefault("epsilon_high", 0.28)
    return lp, grpo_loss(lp, old, adv, mask, loss_type=loss_type, **kw)


def test_grpo_loss_types_differ_on_ragged_masks():
    row_means = [sum(TOK[0]) / 3, sum(TOK[1]) / 1]  # -0.96, 1.6
    total = sum(TOK[0]) + sum(TOK[1])  # -1.28
    assert abs(total + 1.28) < 1e-12

    _, out = run_grpo("grpo")
    assert isinstance(out, GRPOLossOutput)
    close(out.loss, (row_means[0] + row_means[1]) / 2)
    close(out.loss, 0.32)

    _, out = run_grpo("bnpo")
    close(out.loss, total / 4)
    close(out.loss, -0.32)

    _, out = run_grpo("dr_grpo", max_completion_length=5)
    close(out.loss, total / (2 * 5))

    _, out = run_grpo("dapo", num_items=16)
    close(out.loss, total / 16)
    _, out = run_grpo("dapo", num_items=torch.tensor(16.0))
    close(out.loss, -0.08)
    _, out = run_grpo("dapo")  # falls back to the local token count
    close(out.loss, total / 4)


def test_grpo_clip_stats():
    _, out = run_grpo("grpo")
    assert set(out.stats) == {
        "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"
    }
    close(out.stats["clip_ratio/low_mean"], 1 / 4)  # row 1 token 0
    close(out.stats["clip_ratio/high_mean"], 1 / 4)  # row 0 token 0
    close(out.stats["clip_ratio/region_mean"], 2 / 4)
    for v in out.stats.values():
        assert v.dim() == 0 and not v.requires_grad


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_grpo_gradient_by_hand(loss_type):
    lp, out = run_grpo(loss_type, max_completion_length=5, num_items=16)
    out.loss.backward()
    # d/dlp of -A * exp(lp - old) = -A * ratio on unclipped tokens, 0 on clipped and padding.
    raw = [[0.0, -1.0 * 0.5, -1.0 * 1.1], [0.0, 0.0, 0.0]]
    scale = {
        "grpo": [[1 / (2 * 3)] * 3, [1 / (2 * 1)] * 3],
        "bnpo": [[1 / 4] * 3, [1 / 4] * 3],
        "dr_grpo": [[1 / 10] * 3, [1 / 10] * 3],
        "dapo": [[1 / 16] * 3, [1 / 16] * 3],
    }[loss_type]
    close(lp.grad, [[g * s for g, s in zip(gr, sr)] for gr, sr in zip(raw, scale)])
    assert torch.isfinite(lp.grad).all()


def test_grpo_asymmetric_clipping_both_signs():
    eps_low, eps_high = 0.1, 0.3
    # one token per row, full mask, bnpo -> loss = mean of the per-token losses
    cases = [  # (ratio, advantage, expected per-token loss, low clipped, high clipped, grad)
        (1.25, 2.0, -2.0 * 1.25, False, False, -2.0 * 1.25),  # inside [0.9, 1.3]
        (1.35, 2.0, -2.0 * 1.3, False, True, 0.0),  # A > 0 above 1 + eps_high: clipped
        (1.2, -1.0, 1.0 * 1.2, False, False, 1.0 * 1.2),  # A < 0 above: min keeps r*A
        (0.85, -1.0, 1.0 * 0.9, True, False, 0.0),  # A < 0 below 1 - eps_low: clipped
        (0.95, -1.0, 1.0 * 0.95, False, False, 1.0 * 0.95),  # inside
        (0.5, 3.0, -3.0 * 0.5, False, False, -3.0 * 0.5),  # A > 0 below: min keeps r*A
    ]
    n = len(cases)
    lp = t([[math.log(c[0])] for c in cases], grad=True)
    old = torch.zeros(n, 1, dtype=torch.float64)
    adv = t([c[1] for c in cases])
    out = grpo_loss(lp, old, adv, torch.ones(n, 1, dtype=torch.float64), loss_type="bnpo",
                    epsilon_low=eps_low, epsilon_high=eps_high)
    close(out.loss, sum(c[2] for c in cases) / n)
    close(out.stats["clip_ratio/low_mean"], 1 / n)
    close(out.stats["clip_ratio/high_mean"], 1 / n)
    close(out.stats["clip_ratio/region_mean"], 2 / n)
    out.loss.backward()
    close(lp.grad, [[c[5] / n] for c in cases])

    # symmetric eps_high = 0.1 also clips the A > 0 token at ratio 1.25 (A < 0 at 1.2: not)
    lp2 = t([[math.log(c[0])] for c in cases])
    sym = grpo_loss(lp2, old, adv, torch.ones(n, 1, dtype=torch.float64), loss_type="bnpo",
                    epsilon_low=0.1, epsilon_high=0.1)
    exp_sym = [-2.0 * 1.1, -2.0 * 1.1, 1.2, 0.9, 0.95, -1.5]
    close(sym.loss, sum(exp_sym) / n)
    close(sym.stats["clip_ratio/high_mean"], 2 / n)


def test_grpo_beta_k3_term_and_kl_stat():
    # logprobs == old (ratio 1): policy part is -A on every token.
    lp = t([[-1.0, -2.0, -0.5], [-1.5, -1.0, -1.0]], grad=True)
    old = lp.detach().clone()
    d = [[0.5, -0.3, 0.2], [0.1, 7.0, 7.0]]  # ref - logprobs; padding values must not count
    ref = t([[lp[i, j].item() + d[i][j] for j in range(3)] for i in range(2)])
    mask = t([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = [0.5, -1.0]
    beta = 0.04

    def k3(x):
        return math.exp(x) - x - 1

    tok = [[-adv[i] + beta * k3(d[i][j]) for j in range(3)] for i in range(2)]
    lens = [3, 2]
    exp_grpo = mean_([sum(tok[i][:lens[i]]) / lens[i] for i in range(2)])
    out = grpo_loss(lp, old, t(adv), mask, loss_type="grpo", epsilon_low=0.2, epsilon_high=0.2,
                    beta=beta, ref_logprobs=ref)
    close(out.loss, exp_grpo)
    kls = [k3(d[0][0]), k3(d[0][1]), k3(d[0][2]), k3(d[1][0]), k3(d[1][1])]
    assert all(k > 0 for k in kls)
    close(out.stats["kl"], sum(kls) / 5)
    assert set(out.stats) >= {"kl", "clip_ratio/region_mean"}

    out.loss.backward()
    # d/dlp [-A * exp(lp - old)] = -A at ratio 1; d/dlp k3(ref - lp) = 1 - exp(ref - lp)
    exp_grad = [
        [(-adv[i] + beta * (1 - math.exp(d[i][j]))) / lens[i] / 2 if j < lens[i] else 0.0
         for j in range(3)]
        for i in range(2)
    ]
    close(lp.grad, exp_grad)

    # beta = 0: no kl stat, ref ignored
    out0 = grpo_loss(lp.detach(), old, t(adv), mask, loss_type="grpo", epsilon_low=0.2,
                     epsilon_high=0.2, ref_logprobs=ref)
    close(out0.loss, mean_([-adv[0], -adv[1]]))
    assert "kl" not in out0.stats


def test_grpo_entropy_stat_and_old_none():
    lp = t([[-1.0, -2.0], [-0.5, -0.7]], grad=True)
    mask = torch.tensor([[True, False], [True, True]])
    ent = t([[1.0, 100.0], [2.0, 4.0]])
    out = grpo_loss(lp, None, t([2.0, -1.0]), mask, loss_type="grpo", epsilon_low=0.2,
                    epsilon_high=0.2, entropy=ent)
    close(out.stats["entropy"], (1.0 + 2.0 + 4.0) / 3)
    close(out.loss, (-2.0 + 1.0) / 2)  # ratio 1 -> -mean_i A_i for "grpo"
    out.loss.backward()
    close(lp.grad, [[-2.0 / 1 / 2, 0.0], [1.0 / 2 / 2, 1.0 / 2 / 2]])


def test_grpo_empty_row_and_gradients_finite():
    # A row without tokens (length 0) adds 0 to the "grpo" row mean (clamp(min=1)).
    lp = t([[math.log(1.1), 0.0], [5.0, 5.0]], grad=True)
    mask = t([[1.0, 1.0], [0.0, 0.0]])
    out = grpo_loss(lp, torch.zeros(2, 2, dtype=torch.float64), t([1.0, 1.0]), mask,
                    loss_type="grpo", epsilon_low=0.2, epsilon_high=0.2)
    close(out.loss, ((-1.1 - 1.0) / 2 + 0.0) / 2)
    out.loss.backward()
    assert torch.isfinite(lp.grad).all()

    torch.manual_seed(0)
    for loss_type in GRPO_LOSS_TYPES:
        lp = (torch.randn(4, 6) * 0.3 - 2).requires_grad_(True)
        old = lp.detach() + torch.randn(4, 6) * 0.3
        ref = lp.detach() + torch.randn(4, 6) * 0.3
        mask = (torch.arange(6) < torch.tensor([[6], [3], [1], [5]])).float()
        out = grpo_loss(lp, old, torch.randn(4), mask, loss_type=loss_type, epsilon_low=0.2,
                        epsilon_high=0.28, beta=0.04, ref_logprobs=ref,
                        max_completion_length=6, num_items=30)
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(lp.grad).all()
        assert (lp.grad[mask == 0] == 0).all()


def test_grpo_loss_errors():
    lp, old, adv, mask = base_inputs(grad=False)
    kw = dict(epsilon_low=0.2, epsilon_high=0.2)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(lp, old, adv, mask, loss_type="ppo", **kw)
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(lp, old, adv, mask, loss_type="grpo", beta=0.1, **kw)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(lp, old, adv, mask, loss_type="dr_grpo", **kw)
    with pytest.raises(ValueError, match="num_items"):
        grpo_loss(lp, old, adv, mask, loss_type="dapo", num_items=0, **kw)
    with pytest.raises(ValueError):
        grpo_loss(lp, old[:, :2], adv, mask, loss_type="grpo", **kw)
    with pytest.raises(ValueError):
        grpo_loss(lp, old, t([1.0, 2.0, 3.0]), mask, loss_type="grpo", **kw)


# --------------------------------------------------------------------------- RLOO loss


def test_rloo_loss_clipped_and_unclipped():
    cliprange = 0.2
    mask = t([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    # sequence log-ratios: new sums minus old sums over the mask (padding values are junk)
    new = [[0.05, 0.05, 9.0], [-0.2, -0.2, -0.1], [0.02, -9.0, 4.0], [0.3, 0.1, 7.0]]
    old = [[0.0, 0.0, -3.0], [0.0, 0.0, 0.0], [0.0, 5.0, 5.0], [0.0, -0.1, 1.0]]
    diffs = [0.1, -0.5, 0.02, 0.5]
    adv = [1.0, -1.0, 2.0, 0.5]
    rho = [math.exp(x) for x in diffs]
    pg1 = [-a * r for a, r in zip(adv, rho)]
    pg2 = [-a * min(max(r, 1 - cliprange), 1 + cliprange) for a, r in zip(adv, rho)]
    # row 0: ratio 1.105 inside; row 1: A<0, ratio 0.607 < 0.8 -> 0.8 wins (clipped);
    # row 2: inside; row 3: A>0, ratio 1.649 > 1.2 -> -0.5 * 1.2 wins (clipped)
    per_seq = [max(a, b) for a, b in zip(pg1, pg2)]
    close(per_seq, [-math.exp(0.1), 0.8, -2 * math.exp(0.02), -0.6])

    lp = t(new, grad=True)
    out = rloo_loss(lp, t(old), t(adv), mask, cliprange=cliprange)
    assert isinstance(out, RLOOLossOutput)
    close(out.loss, mean_(per_seq))
    close(out.stats["loss/policy"], mean_(per_seq))
    close(out.stats["policy/clipfrac"], 2 / 4)
    close(out.stats["policy/approxkl"], 0.5 * mean_([x * x for x in diffs]))
    close(out.stats["policy/ratio"], mean_(rho))

    out.loss.backward()
    # unclipped rows: d/dlp_t (-A exp(sum lp - sum old)) = -A * rho on masked tokens; clipped: 0
    g = [-adv[0] * rho[0] / 4, 0.0, -adv[2] * rho[2] / 4, 0.0]
    close(lp.grad, [[g[i] * m for m in row] for i, row in enumerate(mask.tolist())])


def test_rloo_loss_on_policy_is_minus_mean_advantage():
    lp = t([[-1.0, -2.0], [-0.3, -0.4]], grad=True)
    out = rloo_loss(lp, lp.detach(), t([1.5, -0.5]), t([[1.0, 1.0], [1.0, 0.0]]), cliprange=0.2)
    close(out.loss, -(1.5 - 0.5) / 2)
    close(out.stats["policy/clipfrac"], 0.0)
    close(out.stats["policy/approxkl"], 0.0)
    close(out.stats["policy/ratio"], 1.0)
    out.loss.backward()
    close(lp.grad, [[-1.5 / 2, -1.5 / 2], [0.5 / 2, 0.0]])
    with pytest.raises(ValueError):
        rloo_loss(lp, lp.detach()[:, :1], t([1.0, 1.0]), t([[1.0, 1.0], [1.0, 0.0]]),
                  cliprange=0.2)
