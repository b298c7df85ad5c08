"""PPO math (losses/ppo.py, rl/kl.py, rl/advantages.py) checked against values worked out by hand.

Every expected number is computed here from the formulas with plain Python floats / loops (``math``),
never by calling the code under test.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from alignctl.losses.dpo import RunningMoments
from alignctl.losses.ppo import (
    PPOLossOutput,
    entropy_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_loss,
)
from alignctl.rl.advantages import gae_advantages, per_token_rewards, scale_scores
from alignctl.rl.kl import (
    KL_PENALTIES,
    AdaptiveKLController,
    FixedKLController,
    build_kl_controller,
    full_kl,
    kl_penalty,
)


def t(xs, dtype=torch.float64, grad=False):
    return torch.tensor(xs, dtype=dtype, requires_grad=grad)


def close(actual, expected, tol=1e-9):
    """Elementwise comparison of a tensor with a (nested) list of Python floats."""
    exp = torch.tensor(expected, dtype=torch.float64)
    act = torch.as_tensor(actual).detach().to(torch.float64)
    assert act.shape == exp.shape, (act.shape, exp.shape)
    assert torch.allclose(act, exp, atol=tol, rtol=tol), (act, exp)


def flat_masked(xs, mask):
    return [x for row, mrow in zip(xs, mask) for x, m in zip(row, mrow) if m]


def mean_(xs):
    return sum(xs) / len(xs)


def var_(xs, unbiased=True):
    mu = mean_(xs)
    ss = sum((x - mu) ** 2 for x in xs)
    return ss / (len(xs) - 1) if unbiased else ss / len(xs)


# --------------------------------------------------------------------------- masked statistics

V = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
M = [[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]  # selects 1, 2, 5, 6


def test_masked_mean_all_and_dim():
    close(masked_mean(t(V), t(M)), (1 + 2 + 5 + 6) / 4)
    close(masked_mean(t(V), t(M), dim=1), [(1 + 2) / 2, (5 + 6) / 2])
    close(masked_mean(t(V), t(M), dim=0), [1.0, (2 + 5) / 2, 6.0])
    close(masked_mean(t(V), t(M).bool()), 3.5)


def test_masked_var_biased_and_unbiased():
    # mean 3.5; squared deviations 6.25, 2.25, 2.25, 6.25 -> sum 17
    close(masked_var(t(V), t(M), unbiased=False), 17 / 4)
    close(masked_var(t(V), t(M)), 17 / 3)
    close(masked_var(t(V), t(M).bool()), 17 / 3)


def test_masked_var_degenerate_masks():
    one = [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="no element"):
        masked_var(t(V), torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="single element"):
        masked_var(t(V), t(one))
    close(masked_var(t(V), t(one), unbiased=False), 0.0)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten(shift_mean):
    mu, sd = 3.5, math.sqrt(17 / 3 + 1e-8)
    expected = [[(x - mu) / sd + (0.0 if shift_mean else mu) for x in row] for row in V]
    close(masked_whiten(t(V), t(M), shift_mean=shift_mean), expected, tol=1e-12)


def test_entropy_from_logits():
    z = [1.0, 2.0, 3.0]
    lse = math.log(sum(math.exp(v) for v in z))
    p = [math.exp(v - lse) for v in z]
    h = -sum(pi * math.log(pi) for pi in p)
    out = entropy_from_logits(t([[z, [0.0, 0.0, 0.0]]]))
    assert out.dtype == torch.float32 and out.shape == (1, 2)
    close(out, [[h, math.log(3)]], tol=1e-6)
    # bf16 in, fp32 out; masked-out (-inf) vocab entries contribute nothing instead of NaN.
    assert entropy_from_logits(t([1.0, 2.0], dtype=torch.bfloat16)).dtype == torch.float32
    masked_vocab = t([[0.0, 0.0, -math.inf], [5.0, -math.inf, -math.inf]])
    close(entropy_from_logits(masked_vocab), [math.log(2), 0.0], 1e-6)


# --------------------------------------------------------------------------- KL penalties

LP = [-1.0, -2.0, -0.5, -3.0]
REF = [-1.5, -1.0, -0.5, -2.25]


@pytest.mark.parametrize("kind", ["kl", "k1", "abs", "mse", "k3"])
def test_kl_penalty_kinds(kind):
    expected = []
    for lp, ref in zip(LP, REF):
        d = lp - ref
        if kind in ("kl", "k1"):
            expected.append(d)
        elif kind == "abs":
            expected.append(abs(d))
        elif kind == "mse":
            expected.append(0.5 * d * d)
        else:  # Schulman's k3 with r = ref - logp
            r = ref - lp
            expected.append((math.exp(r) - 1) - r)
    close(kl_penalty(t([LP]), t([REF]), kind), [expected])


def test_kl_penalty_literal_values():
    # d = 0.5, -1, 0, -0.75
    close(kl_penalty(t(LP), t(REF), "mse"), [0.125, 0.5, 0.0, 0.28125])
    close(kl_penalty(t(LP), t(REF), "abs"), [0.5, 1.0, 0.0, 0.75])
    k3 = kl_penalty(t(LP), t(REF), "k3")
    close(k3[2], 0.0)
    assert (k3 >= 0).all()


def test_kl_penalty_errors():
    assert KL_PENALTIES == ("kl", "k1", "abs", "mse", "k3", "full")
    with pytest.raises(ValueError, match="full_kl"):
        kl_penalty(t(LP), t(REF), "full")
    with pytest.raises(ValueError, match="valid kinds: kl, k1, abs, mse, k3, full"):
        kl_penalty(t(LP), t(REF), "k2")


def _hand_kl(z, zref, temp=1.0):
    def logsm(xs):
        xs = [x / temp for x in xs]
        lse = math.log(sum(math.exp(x) for x in xs))
        return [x - lse for x in xs]

    lp, lq = logsm(z), logsm(zref)
    return sum(math.exp(a) * (a - b) for a, b in zip(lp, lq))


def test_full_kl_three_word_vocab():
    z = [[[1.0, 0.0, -1.0], [0.5, 0.5, 0.5]]]  # [B=1, R=2, V=3]
    zr = [[[0.0, 1.0, 0.0], [2.0, -1.0, 0.0]]]
    expected = [[_hand_kl(z[0][0], zr[0][0]), _hand_kl(z[0][1], zr[0][1])]]
    out = full_kl(t(z), t(zr))
    assert out.dtype == torch.float32 and out.shape == (1, 2)
    close(out, expected, tol=1e-6)
    assert expected[0][0] > 0
    expected_t = [[_hand_kl(z[0][0], zr[0][0], 2.0), _hand_kl(z[0][1], zr[0][1], 2.0)]]
    close(full_kl(t(z), t(zr), temperature=2.0), expected_t, tol=1e-6)
    # Same as TRL's "full" penalty form.
    lp, lq = F.log_softmax(t(z), -1), F.log_softmax(t(zr), -1)
    close(full_kl(t(z), t(zr)), F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1).tolist(), 1e-6)
    close(full_kl(t(z), t(z)), [[0.0, 0.0]], tol=1e-7)


# --------------------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(6.6, n_steps=256)  # error 6.6/6 - 1 = 0.1
    v1 = 0.2 * (1 + 0.1 * 256 / 10000)
    assert ctl.value == pytest.approx(v1, rel=1e-12)
    ctl.update(100.0, n_steps=512)  # error 15.67 clipped to +0.2
    v2 = v1 * (1 + 0.2 * 512 / 10000)
    assert ctl.value == pytest.approx(v2, rel=1e-12)
    ctl.update(torch.tensor(0.0), n_steps=1000)  # error -1 clipped to -0.2
    v3 = v2 * (1 - 0.2 * 1000 / 10000)
    assert ctl.value == pytest.approx(v3, rel=1e-12)
    ctl.update(4.5, n_steps=10000)  # error -0.25 clipped to -0.2, full horizon
    v4 = v3 * 0.8
    assert ctl.value == pytest.approx(v4, rel=1e-12)

    state = ctl.state_dict()
    assert state == {"value": pytest.approx(v4)} and isinstance(state["value"], float)
    other = AdaptiveKLController(1.0, 6.0, 10000)
    other.load_state_dict(state)
    assert other.value == ctl.value
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.2, target=0.0, horizon=10)


def test_fixed_kl_controller_and_builder():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, n_steps=512)
    assert ctl.value == 0.05 and ctl.state_dict() == {"value": 0.05}
    ctl.load_state_dict({"value": 0.3})
    assert ctl.value == 0.3
    assert isinstance(build_kl_controller(False, 0.1, 6.0, 10000), FixedKLController)
    adaptive = build_kl_controller(True, 0.1, 6.0, 10000)
    assert isinstance(adaptive, AdaptiveKLController) and adaptive.value == 0.1
    assert (adaptive.target, adaptive.horizon) == (6.0, 10000)


# --------------------------------------------------------------------------- per-token rewards

# Right padding, left padding, no padding, a gap (last non-zero index wins), different lengths.
RMASK = [[1, 1, 0, 0], [0, 1, 1, 1], [1, 1, 1, 1], [1, 0, 1, 0]]
RLP = [[-1.0, -2.0, -3.0, -4.0], [-0.5, -0.7, -1.1, -0.2], [-2.0, -0.1, -0.3, -0.4], [-1.0, -1.0, -1.0, -1.0]]
RREF = [[-1.5, -1.0, -3.0, -9.0], [-0.5, -0.2, -1.4, -0.6], [-1.0, -0.3, -0.3, -0.1], [-2.0, -0.5, -1.5, -3.0]]
SCORES = [2.0, -1.0, 0.5, 3.0]


def test_per_token_rewards_score_on_last_unmasked_token():
    kl_coef = 0.1
    rewards, non_score, kl = per_token_rewards(t(SCORES), t(RLP), t(RREF), t(RMASK), kl_coef)
    exp_kl = [[a - b for a, b in zip(ra, rb)] for ra, rb in zip(RLP, RREF)]
    exp_ns = [[-kl_coef * k for k in row] for row in exp_kl]
    exp_r = [list(row) for row in exp_ns]
    for i, mrow in enumerate(RMASK):
        last = max(j for j, m in enumerate(mrow) if m)
        exp_r[i][last] += SCORES[i]
    assert [max(j for j, m in enumerate(r) if m) for r in RMASK] == [1, 3, 3, 2]
    close(kl, exp_kl)
    close(non_score, exp_ns)
    close(rewards, exp_r)
    # Masked positions keep their KL term (TRL does not mask rewards here).
    close(rewards[0, 3], -kl_coef * (-4.0 + 9.0))


def test_per_token_rewards_bool_mask_kind_and_precomputed_kl():
    mask = t(RMASK).bool()
    rewards, _, kl = per_token_rewards(t(SCORES), t(RLP), t(RREF), mask, 0.5, kind="abs")
    close(kl[0], [0.5, 1.0, 0.0, 5.0])
    close(rewards[0], [-0.25, -0.5 + 2.0, 0.0, -2.5])
    given = t([[0.1, 0.2, 0.3, 0.4]] * 4)
    rewards, non_score, kl = per_token_rewards(
        t(SCORES), t(RLP), t(RREF), t(RMASK), 2.0, kind="full", kl=given
    )
    assert kl is given
    close(non_score[1], [-0.2, -0.4, -0.6, -0.8])
    close(rewards[1], [-0.2, -0.4, -0.6, -0.8 - 1.0])
    with pytest.raises(ValueError, match="full_kl"):
        per_token_rewards(t(SCORES), t(RLP), t(RREF), t(RMASK), 2.0, kind="full")


def test_per_token_rewards_empty_row_raises():
    mask = [list(r) for r in RMASK]
    mask[2] = [0, 0, 0, 0]
    with pytest.raises(ValueError, match=r"\[2\]"):
        per_token_rewards(t(SCORES), t(RLP), t(RREF), t(mask), 0.1)


# --------------------------------------------------------------------------- GAE


def _hand_gae(values, rewards, mask, gamma, lam, whiten_rewards=False):
    """TRL compute_advantages with Python floats; returns (values, whitened adv, returns)."""
    B, R = len(values), len(values[0])
    v = [[values[i][j] * mask[i][j] for j in range(R)] for i in range(B)]
    r = [[rewards[i][j] * mask[i][j] for j in range(R)] for i in range(B)]
    if whiten_rewards:
        sel = flat_masked(r, mask)
        mu, sd = mean_(sel), math.sqrt(var_(sel) + 1e-8)
        r = [[(x - mu) / sd + mu for x in row] for row in r]
    adv = [[0.0] * R for _ in range(B)]
    for i in range(B):
        last = 0.0
        for j in reversed(range(R)):
            nxt = v[i][j + 1] if j < R - 1 else 0.0
            delta = r[i][j] + gamma * nxt - v[i][j]
            last = delta + gamma * lam * last
            adv[i][j] = last
    ret = [[adv[i][j] + v[i][j] for j in range(R)] for i in range(B)]
    sel = flat_masked(adv, mask)
    mu, sd = mean_(sel), math.sqrt(var_(sel) + 1e-8)
    white = [[(a - mu) / sd for a in row] for row in adv]
    return v, white, ret


def test_gae_1x3_explicit_scalars():
    g, lam = 0.9, 0.8
    v0, v1, v2 = 0.5, -0.2, 1.0
    r0, r1, r2 = 0.1, -0.3, 2.0
    a2 = r2 + g * 0.0 - v2
    a1 = (r1 + g * v2 - v1) + g * lam * a2
    a0 = (r0 + g * v1 - v0) + g * lam * a1
    mu = (a0 + a1 + a2) / 3
    var = ((a0 - mu) ** 2 + (a1 - mu) ** 2 + (a2 - mu) ** 2) / 2
    sd = math.sqrt(var + 1e-8)
    values = t([[v0, v1, v2]], grad=True)
    vals, adv, ret = gae_advantages(values, t([[r0, r1, r2]]), t([[1.0, 1.0, 1.0]]), g, lam)
    close(vals, [[v0, v1, v2]])
    close(ret, [[a0 + v0, a1 + v1, a2 + v2]])
    close(adv, [[(a0 - mu) / sd, (a1 - mu) / sd, (a2 - mu) / sd]])
    assert not adv.requires_grad


def test_gae_2x3_with_padding():
    g, lam = 0.95, 0.5
    values = [[0.5, -0.2, 1.0], [0.3, 0.7, 9.0]]  # 9.0 sits on padding and is masked away
    rewards = [[0.1, -0.3, 2.0], [0.0, 1.5, 7.0]]
    mask = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
    # Row 1 by hand: position 2 is padding, so V = r = 0 there.
    b2 = 0.0
    b1 = (1.5 + g * 0.0 - 0.7) + g * lam * b2
    b0 = (0.0 + g * 0.7 - 0.3) + g * lam * b1
    ev, ew, er = _hand_gae(values, rewards, mask, g, lam)
    assert ev[1][2] == 0.0
    assert er[1] == pytest.approx([b0 + 0.3, b1 + 0.7, 0.0], rel=1e-12)
    vals, adv, ret = gae_advantages(t(values), t(rewards), t(mask), g, lam)
    close(vals, ev)
    close(ret, er)
    close(adv, ew, tol=1e-9)
    close(ret[1], [b0 + 0.3, b1 + 0.7, 0.0])
    # Whitened over the 5 masked entries only: masked mean 0, unbiased variance ~1.
    close(masked_mean(adv, t(mask)), 0.0, tol=1e-9)


def test_gae_whiten_rewards():
    g, lam = 0.9, 0.95
    values = [[0.5, -0.2, 1.0], [0.3, 0.7, 9.0]]
    rewards = [[0.1, -0.3, 2.0], [0.0, 1.5, 7.0]]
    mask = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
    ev, ew, er = _hand_gae(values, rewards, mask, g, lam, whiten_rewards=True)
    _, plain_w, plain_r = _hand_gae(values, rewards, mask, g, lam)
    assert abs(er[0][0] - plain_r[0][0]) > 1e-3  # whitening the rewards really changes things
    vals, adv, ret = gae_advantages(t(values), t(rewards), t(mask), g, lam, whiten_rewards=True)
    close(vals, ev)
    close(ret, er)
    close(adv, ew)


# --------------------------------------------------------------------------- PPO loss

PMASK = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
OLD = [[-1.0, -2.0, -0.5], [-1.2, -0.8, -3.0]]
DLOG = [[0.0, 0.3, -0.3], [0.1, -0.5, 2.0]]  # logprobs - old_logprobs
NEW = [[o + d for o, d in zip(ro, rd)] for ro, rd in zip(OLD, DLOG)]
ADV = [[1.0, 2.0, -1.0], [-0.5, 1.5, 3.0]]
VALS = [[0.5, 1.0, -0.2], [0.0, 0.3, 9.9]]
VPRED = [[0.6, 1.5, -0.6], [-0.3, 0.2, -9.9]]
RET = [[1.0, 0.8, 0.0], [-0.35, 0.35, 4.0]]
CLIP, CLIPV, VF_COEF = 0.2, 0.2, 0.1


def _hand_ppo(cliprange=CLIP, cliprange_value=CLIPV, vf_coef=VF_COEF):
    pg, pgc, vf, vfc, ratios, entries = [], [], [], [], [], []
    for i in range(2):
        for j in range(3):
            if not PMASK[i][j]:
                continue
            lo, hi = VALS[i][j] - cliprange_value, VALS[i][j] + cliprange_value
            vclip = min(max(VPRED[i][j], lo), hi)
            l1 = (VPRED[i][j] - RET[i][j]) ** 2
            l2 = (vclip - RET[i][j]) ** 2
            vf.append(max(l1, l2))
            vfc.append(1.0 if l2 > l1 else 0.0)
            ratio = math.exp(NEW[i][j] - OLD[i][j])
            p1 = -ADV[i][j] * ratio
            p2 = -ADV[i][j] * min(max(ratio, 1 - cliprange), 1 + cliprange)
            pg.append(max(p1, p2))
            pgc.append(1.0 if p2 > p1 else 0.0)
            ratios.append(ratio)
    pg_loss, vf_loss = mean_(pg), 0.5 * mean_(vf)
    return dict(
        pg_loss=pg_loss,
        vf_loss=vf_loss,
        total=pg_loss + vf_coef * vf_loss,
        pg_clipfrac=mean_(pgc),
        vf_clipfrac=mean_(vfc),
        ratio=mean_(ratios),
    )


def _call(**kw):
    logprobs = t(NEW, grad=True)
    vpreds = t(VPRED, grad=True)
    args = dict(cliprange=CLIP, cliprange_value=CLIPV, vf_coef=VF_COEF)
    args.update(kw)
    out = ppo_loss(logprobs, t(OLD), t(VALS), vpreds, t(ADV), t(RET), t(PMASK), **args)
    return out, logprobs, vpreds


def test_ppo_loss_clipped_case_and_stats():
    h = _hand_ppo()
    # Which tokens clip, decided by hand: policy (0,1) and (0,2) clip; (1,1) is the pessimistic
    # unclipped branch; value (1,0) takes the clipped loss.
    assert h["pg_clipfrac"] == 2 / 5 and h["vf_clipfrac"] == 1 / 5
    pg_literal = (-1.0 + -2.0 * 1.2 + 1.0 * 0.8 + 0.5 * math.exp(0.1) + -1.5 * math.exp(-0.5)) / 5
    vf_literal = 0.5 * (0.4**2 + 0.7**2 + 0.6**2 + 0.15**2 + 0.15**2) / 5
    assert h["pg_loss"] == pytest.approx(pg_literal, rel=1e-12)
    assert h["vf_loss"] == pytest.approx(vf_literal, rel=1e-12)

    out, _, _ = _call()
    assert isinstance(out, PPOLossOutput) and out.skipped is False
    close(out.policy_loss, h["pg_loss"])
    close(out.value_loss, h["vf_loss"])
    close(out.loss, h["total"])

    s = out.stats
    sel = lambda xs: flat_masked(xs, PMASK)  # noqa: E731
    d = sel(DLOG)
    expected = {
        "loss/policy": h["pg_loss"],
        "loss/value": h["vf_loss"],  # raw, not multiplied by vf_coef
        "loss/total": h["total"],
        "policy/approxkl": 0.5 * mean_([x * x for x in d]),
        "policy/policykl": mean_([-x for x in d]),
        "policy/clipfrac": 0.4,
        "policy/advantages_mean": mean_(sel(ADV)),
        "policy/ratio": h["ratio"],
        "returns/mean": mean_(sel(RET)),
        "returns/var": var_(sel(RET)),
        "val/vpred": mean_(sel(VPRED)),
        "val/error": mean_([(a - b) ** 2 for a, b in zip(sel(VPRED), sel(RET))]),
        "val/clipfrac": 0.2,
        "val/mean": mean_(sel(VALS)),
        "val/var": var_(sel(VALS)),
    }
    assert set(s) == set(expected)
    for key, value in expected.items():
        assert s[key].dim() == 0 and not s[key].requires_grad, key
        assert s[key].item() == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_ppo_loss_unclipped_case():
    out, _, _ = _call(cliprange=10.0, cliprange_value=100.0, vf_coef=0.5)
    pg = [-a * math.exp(x) for a, x in zip(flat_masked(ADV, PMASK), flat_masked(DLOG, PMASK))]
    vf = [(a - b) ** 2 for a, b in zip(flat_masked(VPRED, PMASK), flat_masked(RET, PMASK))]
    close(out.policy_loss, mean_(pg))
    close(out.value_loss, 0.5 * mean_(vf))
    close(out.loss, mean_(pg) + 0.5 * 0.5 * mean_(vf))
    assert out.stats["policy/clipfrac"].item() == 0.0 and out.stats["val/clipfrac"].item() == 0.0


def test_ppo_loss_gradients_by_hand():
    out, logprobs, vpreds = _call()
    out.loss.backward()
    assert torch.isfinite(logprobs.grad).all() and torch.isfinite(vpreds.grad).all()
    n = 5
    # d pg_loss / d logprob = -A * ratio / n on unclipped tokens, 0 on clipped / padded ones.
    exp_lp = [
        [-1.0 * 1.0 / n, 0.0, 0.0],
        [0.5 * math.exp(0.1) / n, -1.5 * math.exp(-0.5) / n, 0.0],
    ]
    close(logprobs.grad, exp_lp, tol=1e-12)
    # d (vf_coef * vf_loss) / d vpred = vf_coef * 0.5 * 2 (vpred - ret) / n where the unclipped
    # square wins, 0 where the clipped (saturated) one wins or on padding.
    c = VF_COEF / n
    exp_v = [[c * (0.6 - 1.0), c * (1.5 - 0.8), c * (-0.6 - 0.0)], [0.0, c * (0.2 - 0.35), 0.0]]
    close(vpreds.grad, exp_v, tol=1e-12)


def test_ppo_loss_ratio_threshold_skip():
    h = _hand_ppo()
    assert h["ratio"] < 1.0
    kept, _, _ = _call(ratio_threshold=1.0)
    assert kept.skipped is False
    close(kept.loss, h["total"])

    out, logprobs, vpreds = _call(ratio_threshold=0.5)
    assert out.skipped is True
    for value in (out.loss, out.policy_loss, out.value_loss):
        close(value, 0.0)
    for key in ("loss/policy", "loss/value", "loss/total"):
        assert out.stats[key].item() == 0.0
    close(out.stats["policy/ratio"], h["ratio"])  # other stats still reported
    out.loss.backward()
    assert (logprobs.grad == 0).all() and (vpreds.grad == 0).all()


def test_ppo_loss_entropy_stat():
    ent = [[1.0, 2.0, 4.0], [0.5, 0.25, 100.0]]
    out, _, _ = _call(entropy=t(ent))
    close(out.stats["policy/entropy"], (1.0 + 2.0 + 4.0 + 0.5 + 0.25) / 5)
    assert "policy/entropy" not in _call()[0].stats


def _loss(mask, adv=ADV, **kw):
    args = dict(cliprange=CLIP, cliprange_value=CLIPV, vf_coef=VF_COEF)
    args.update(kw)
    return ppo_loss(t(NEW), t(OLD), t(VALS), t(VPRED), t(adv), t(RET), mask, **args)


def test_ppo_loss_single_token_and_bad_inputs():
    mask = t([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    out = _loss(mask, vf_coef=1.0)
    assert out.stats["returns/var"].item() == 0.0 and out.stats["val/var"].item() == 0.0
    close(out.policy_loss, -2.0 * 1.2)  # token (0, 1), clipped
    with pytest.raises(ValueError, match="no response token"):
        _loss(mask * 0)
    with pytest.raises(ValueError, match="same"):
        _loss(mask, adv=[row[:2] for row in ADV])


def test_ppo_loss_bool_mask_matches_float_mask():
    a, _, _ = _call()
    b = _loss(t(PMASK).bool())
    close(b.loss, a.loss.item())
    for key in a.stats:
        # clipfracs are fp32 ``.float()`` means (as in TRL), so only fp32-close.
        assert b.stats[key].item() == pytest.approx(a.stats[key].item(), rel=1e-6), key


# --------------------------------------------------------------------------- score scaling

S = [1.0, 2.0, 4.0]
# First RunningMoments update from its prior (count 1e-24): mean 7/3, std = sqrt(unbiased var) =
# sqrt((16/9 + 1/9 + 25/9) / 2) = sqrt(7/3), up to the 1e-24 prior and fp32 rounding.
S_MEAN, S_STD = 7 / 3, math.sqrt(7 / 3)
EPS64 = 2.220446049250313e-16


def test_scale_scores_scaling_only():
    scores = t(S)
    running = RunningMoments()
    out = scale_scores(scores, running, use_score_scaling=True, use_score_norm=False, score_clip=None)
    assert running.mean == pytest.approx(S_MEAN, rel=1e-6) and running.std == pytest.approx(S_STD, rel=1e-6)
    close(out, [x / (S_STD + EPS64) for x in S], tol=1e-6)
    close(scores, S)  # input untouched


def test_scale_scores_norm_and_clip():
    running = RunningMoments()
    out = scale_scores(t(S), running, use_score_scaling=True, use_score_norm=True, score_clip=None)
    normed = [(x - S_MEAN) / (S_STD + EPS64) for x in S]
    close(out, normed, tol=1e-6)
    running = RunningMoments()
    clipped = scale_scores(t(S), running, use_score_scaling=True, use_score_norm=True, score_clip=0.5)
    close(clipped, [min(max(x, -0.5), 0.5) for x in normed], tol=1e-6)
    assert clipped.dtype == torch.float64


def test_scale_scores_clip_only_and_norm_without_scaling_is_noop():
    running = RunningMoments()
    scores = t([3.0, -7.0, 0.25])
    out = scale_scores(scores, running, use_score_scaling=False, use_score_norm=True, score_clip=None)
    close(out, [3.0, -7.0, 0.25])
    assert out is not scores and running.count == 1e-24  # running stats not touched
    out = scale_scores(scores, running, use_score_scaling=False, use_score_norm=False, score_clip=1.0)
    close(out, [1.0, -1.0, 0.25])
    close(scores, [3.0, -7.0, 0.25])
    f32 = scale_scores(
        t(S, torch.float32), RunningMoments(), use_score_scaling=True, use_score_norm=False, score_clip=None
    )
    assert f32.dtype == torch.float32
    close(f32, [x / (S_STD + 1.1920928955078125e-07) for x in S], tol=1e-6)
