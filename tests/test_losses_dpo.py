"""DPO-family losses checked against values computed by hand with ``math`` from the formulas."""

import math

import pytest
import torch

from alignctl.losses.dpo import DPO_LOSS_TYPES, RunningMoments, combined_dpo_loss, dpo_loss, wpo_weights

# Per-sequence summed log-probs, B = 3 (policy chosen/rejected, reference chosen/rejected).
C = [-10.0, -12.5, -8.0]
R = [-11.0, -9.0, -15.0]
RC = [-10.5, -12.0, -9.0]
RR = [-10.0, -10.0, -13.0]
# Answer lengths (sigmoid_norm, ipo with lengths) and the chosen NLL (sft).
NC = [5, 8, 4]
NR = [6, 3, 10]
NLL = 2.5


def extras(loss_type):
    """What the length-normalised and sft loss types need beside the log-probs."""
    if loss_type == "sigmoid_norm":
        return {"lengths": (torch.tensor(NC), torch.tensor(NR))}
    if loss_type == "sft":
        return {"chosen_nll": torch.tensor(NLL, dtype=torch.float64)}
    return {}


def t(xs, dtype=torch.float64, grad=False):
    return torch.tensor(xs, dtype=dtype, requires_grad=grad)


def logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def smoothed(u, eps):
    return -(1 - eps) * logsig(u) - eps * logsig(-u)


def margins(c=C, r=R, rc=RC, rr=RR, ref_free=False):
    """DPO logits (c - r) - (rc - rr) per example, as python floats."""
    return [(ci - ri) - (0.0 if ref_free else (rci - rri)) for ci, ri, rci, rri in zip(c, r, rc, rr)]


def ratios(p, ref):
    return [a - b for a, b in zip(p, ref)]


def expected(loss_type, beta, eps=0.0, ref_free=False, tau=0.05):
    """Hand formulas per loss type (only the logit-based and apo types honour ref_free, as in TRL)."""
    z = margins(ref_free=ref_free)
    cr, rr_ = ratios(C, RC), ratios(R, RR)
    if loss_type == "sigmoid":
        return [smoothed(beta * x, eps) for x in z]
    if loss_type == "robust":
        return [(-(1 - eps) * logsig(beta * x) + eps * logsig(-beta * x)) / (1 - 2 * eps) for x in z]
    if loss_type == "exo_pair":
        e = eps or 1e-3
        return [
            sig(beta * x) * (logsig(beta * x) - math.log(1 - e)) + sig(-beta * x) * (logsig(-beta * x) - math.log(e))
            for x in z
        ]
    if loss_type == "hinge":
        return [max(0.0, 1 - beta * x) for x in z]
    if loss_type == "ipo":
        return [(x - 1 / (2 * beta)) ** 2 for x in z]
    if loss_type == "sppo_hard":
        return [(a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2 for a, b in zip(cr, rr_)]
    if loss_type == "nca_pair":
        return [-logsig(beta * a) - 0.5 * logsig(-beta * a) - 0.5 * logsig(-beta * b) for a, b in zip(cr, rr_)]
    if loss_type == "aot":
        pol = sorted(c - r for c, r in zip(C, R))
        ref = sorted(a - b for a, b in zip(RC, RR))
        return [smoothed(beta * (p - q), eps) for p, q in zip(pol, ref)]
    if loss_type == "aot_pair":
        return [smoothed(beta * (a - b), eps) for a, b in zip(sorted(cr), sorted(rr_))]
    if loss_type in ("apo_zero", "apo_down"):
        a_ = C if ref_free else cr
        b_ = R if ref_free else rr_
        if loss_type == "apo_zero":
            return [(1 - sig(beta * a)) + sig(beta * b) for a, b in zip(a_, b_)]
        return [sig(beta * a) + (1 - sig(beta * (a - b))) for a, b in zip(a_, b_)]
    if loss_type == "discopop":
        out = []
        for x in margins():
            u = beta * x
            m = sig(u / tau)
            out.append(-logsig(u) * (1 - m) + math.exp(-u) * m)
        return out
    if loss_type == "kto_pair":
        kl_c = max(0.0, sum(cr) / len(cr))
        kl_r = max(0.0, sum(rr_) / len(rr_))
        return [1 - sig(beta * (a - kl_r)) for a in cr] + [1 - sig(beta * (kl_c - b)) for b in rr_]
    if loss_type == "bco_pair":
        rewards = [beta * v for v in cr + rr_]
        delta = sum(rewards) / len(rewards)
        return [-logsig(beta * a - delta) - logsig(-(beta * b - delta)) for a, b in zip(cr, rr_)]
    if loss_type == "sigmoid_norm":
        return [-logsig(beta * (a / nc - b / nr)) for a, b, nc, nr in zip(cr, rr_, NC, NR)]
    if loss_type == "sft":
        return [NLL] * len(C)
    raise AssertionError(loss_type)


def run(loss_type, **kw):
    return dpo_loss(t(C), t(R), t(RC), t(RR), loss_type=loss_type, **{**extras(loss_type), **kw})


def close(tensor, values, tol=1e-9):
    assert list(tensor.shape) == [len(values)]
    for got, want in zip(tensor.tolist(), values):
        assert got == pytest.approx(want, rel=tol, abs=tol)


def test_loss_type_names():
    assert set(DPO_LOSS_TYPES) == {
        "sigmoid", "hinge", "ipo", "robust", "kto_pair", "bco_pair", "sppo_hard", "nca_pair",
        "aot", "aot_pair", "exo_pair", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft",
    }  # fmt: skip


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_every_loss_type_matches_hand_formula(loss_type, beta):
    out = run(loss_type, beta=beta)
    close(out.losses, expected(loss_type, beta))
    # Rewards are beta * (policy - reference), detached, for every loss type.
    close(out.chosen_rewards, [beta * v for v in ratios(C, RC)])
    close(out.rejected_rewards, [beta * v for v in ratios(R, RR)])
    assert out.reward_mean.item() == pytest.approx(beta * sum(ratios(C, RC) + ratios(R, RR)) / 6, abs=1e-12)


def test_literal_anchor_values():
    # logits = 10, beta = 0.1: -log sigmoid(1) = log(1 + e^-1)
    out = dpo_loss(t([-1.0]), t([-11.0]), t([-5.0]), t([-5.0]), beta=0.1)
    assert out.losses.item() == pytest.approx(0.31326168751822286, abs=1e-12)
    hinge = dpo_loss(t([-1.0]), t([-11.0]), t([-5.0]), t([-5.0]), beta=0.05, loss_type="hinge")
    assert hinge.losses.item() == pytest.approx(0.5, abs=1e-12)
    ipo = dpo_loss(t([-1.0]), t([-11.0]), t([-5.0]), t([-5.0]), beta=0.1, loss_type="ipo")
    assert ipo.losses.item() == pytest.approx(25.0, abs=1e-12)  # (10 - 5)^2


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_policy_equals_reference_gives_log2(beta):
    x = t([-3.0, -40.0, -7.5])
    y = t([-9.0, -2.0, -7.5])
    out = dpo_loss(x, y, x.clone(), y.clone(), beta=beta)
    close(out.losses, [math.log(2)] * 3, tol=1e-12)


@pytest.mark.parametrize("eps", [0.1, 0.3])
@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "exo_pair", "aot", "aot_pair"])
def test_label_smoothing(loss_type, eps):
    out = run(loss_type, beta=0.5, label_smoothing=eps)
    close(out.losses, expected(loss_type, 0.5, eps=eps))


def test_cdpo_smoothing_is_a_mixture():
    eps, beta = 0.2, 0.1
    z = margins()[0]
    out = run("sigmoid", beta=beta, label_smoothing=eps)
    assert out.losses[0].item() == pytest.approx(
        0.8 * math.log1p(math.exp(-beta * z)) + 0.2 * math.log1p(math.exp(beta * z)), abs=1e-12
    )


def test_exo_pair_default_epsilon_when_no_smoothing():
    a = run("exo_pair", beta=0.5, label_smoothing=0.0).losses
    b = run("exo_pair", beta=0.5, label_smoothing=1e-3).losses
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust", "exo_pair", "apo_zero", "apo_down"])
def test_reference_free_drops_reference_in_logits(loss_type, beta):
    out = run(loss_type, beta=beta, reference_free=True, label_smoothing=0.1 if loss_type != "hinge" else 0.0)
    eps = 0.1 if loss_type in ("sigmoid", "robust", "exo_pair") else 0.0
    close(out.losses, expected(loss_type, beta, eps=eps, ref_free=True))
    # TRL keeps the reference in the reported rewards even when reference_free.
    close(out.chosen_rewards, [beta * v for v in ratios(C, RC)])


@pytest.mark.parametrize("loss_type", ["sppo_hard", "nca_pair", "aot", "aot_pair", "discopop", "kto_pair", "bco_pair"])
def test_reference_free_ignored_by_ratio_based_losses(loss_type):
    a = run(loss_type, beta=0.5, reference_free=True)
    b = run(loss_type, beta=0.5, reference_free=False)
    torch.testing.assert_close(a.losses, b.losses, rtol=0, atol=0)


def test_reference_free_with_zero_reference_is_fully_reference_free():
    zeros = t([0.0, 0.0, 0.0])
    out = dpo_loss(t(C), t(R), zeros, zeros, beta=0.1, reference_free=True)
    close(out.chosen_rewards, [0.1 * v for v in C])
    close(out.losses, expected("sigmoid", 0.1, ref_free=True))


def test_aot_sorts_within_batch():
    # Permuting the batch permutes nothing in the output: losses are over sorted margins.
    perm = [2, 0, 1]
    pick = lambda xs: t([xs[i] for i in perm])  # noqa: E731
    a = run("aot", beta=0.5).losses
    b = dpo_loss(pick(C), pick(R), pick(RC), pick(RR), beta=0.5, loss_type="aot").losses
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # ...and differs from the unsorted sigmoid loss on this batch.
    assert not torch.allclose(a, run("sigmoid", beta=0.5).losses)


def test_kto_pair_shape_and_halves():
    out = run("kto_pair", beta=0.1)
    assert out.losses.shape == (6,)
    close(out.losses, expected("kto_pair", 0.1))


def test_discopop_tau():
    out = run("discopop", beta=0.5, discopop_tau=0.5)
    close(out.losses, expected("discopop", 0.5, tau=0.5))


def test_bco_pair_running_mean_variants():
    beta = 0.1
    rewards = [beta * v for v in ratios(C, RC) + ratios(R, RR)]
    batch_mean = sum(rewards) / 6
    cr, rr_ = ratios(C, RC), ratios(R, RR)

    def bco(delta):
        return [-logsig(beta * a - delta) - logsig(-(beta * b - delta)) for a, b in zip(cr, rr_)]

    # None: fresh tracker, delta = this batch's reward mean.
    out = run("bco_pair", beta=beta)
    close(out.losses, bco(batch_mean), tol=1e-6)
    assert out.reward_mean.item() == pytest.approx(batch_mean, abs=1e-12)
    # A float is used as delta as is.
    close(run("bco_pair", beta=beta, running_mean=0.25).losses, bco(0.25))
    # A tracker is updated with this batch's mean before use (count grows by one per batch).
    tracker = RunningMoments()
    tracker.update(torch.tensor(1.0))
    out = run("bco_pair", beta=beta, running_mean=tracker)
    assert tracker.mean == pytest.approx((1.0 + batch_mean) / 2, abs=1e-6)
    assert tracker.count == pytest.approx(2.0)
    assert tracker.var == pytest.approx(((1.0 - batch_mean) / 2) ** 2, abs=1e-6)
    close(out.losses, bco((1.0 + batch_mean) / 2), tol=1e-6)


def test_running_moments_matches_pooled_statistics():
    rm = RunningMoments()
    xs1, xs2 = [1.0, 2.0, 4.0], [0.0, 3.0]
    rm.update(torch.tensor(xs1))
    rm.update(torch.tensor(xs2))
    allx = xs1 + xs2
    mean = sum(allx) / 5
    var = sum((x - mean) ** 2 for x in allx) / 5
    assert rm.mean == pytest.approx(mean, abs=1e-6)
    assert rm.var == pytest.approx(var, abs=1e-5)
    assert rm.std == pytest.approx(math.sqrt(var * 5 / 4), abs=1e-5)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_gradients_flow_and_rewards_are_detached(loss_type):
    c, r = t(C, grad=True), t(R, grad=True)
    kw = extras(loss_type)
    if loss_type == "sft":  # its gradient flows through the NLL, not the sequence log-probs
        c = kw["chosen_nll"] = torch.tensor(NLL, dtype=torch.float64, requires_grad=True)
    out = dpo_loss(t(C, grad=True) if loss_type == "sft" else c, r, t(RC), t(RR), beta=0.5, loss_type=loss_type, **kw)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    assert not out.reward_mean.requires_grad
    out.losses.sum().backward()
    assert c.grad is not None and torch.isfinite(c.grad).all()


def test_sigmoid_gradient_matches_hand_derivative():
    beta = 0.1
    c = t(C, grad=True)
    dpo_loss(c, t(R), t(RC), t(RR), beta=beta).losses.sum().backward()
    # d/dc [-log sigma(beta z)] = -beta * sigma(-beta z)
    close(c.grad, [-beta * sig(-beta * z) for z in margins()])


def test_float32_inputs():
    out = dpo_loss(t(C, torch.float32), t(R, torch.float32), t(RC, torch.float32), t(RR, torch.float32), beta=0.1)
    assert out.losses.dtype == torch.float32
    close(out.losses, expected("sigmoid", 0.1), tol=1e-6)


def test_unknown_loss_type_lists_valid_names():
    with pytest.raises(ValueError) as err:
        run("dpo_typo")
    msg = str(err.value)
    assert "dpo_typo" in msg
    for name in DPO_LOSS_TYPES:
        assert name in msg


# ------------------------------------------------------------------ options of TRL 1.16.0


def f_scores(ratio, kind, a=0.5):
    """f'(t) of t = exp(ratio), by hand."""
    u = math.exp(ratio)
    return {
        "reverse_kl": ratio,
        "forward_kl": 1 - 1 / u,
        "js_divergence": math.log(2 * u / (1 + u)),
        "alpha_divergence": (u ** (a - 1) - 1) / (a - 1),
    }[kind]


@pytest.mark.parametrize("kind", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "discopop"])
def test_f_divergence_scores_replace_the_log_ratios(kind, loss_type):
    beta, tau = 0.5, 0.05
    out = run(loss_type, beta=beta, f_divergence_type=kind, f_alpha_divergence_coef=0.3, discopop_tau=tau)
    deltas = [f_scores(a, kind, 0.3) - f_scores(b, kind, 0.3) for a, b in zip(ratios(C, RC), ratios(R, RR))]
    if loss_type == "sigmoid":
        want = [-logsig(beta * d) for d in deltas]
    elif loss_type == "hinge":
        want = [max(0.0, 1 - beta * d) for d in deltas]
    else:
        want = [-logsig(beta * d) * (1 - sig(beta * d / tau)) + math.exp(-beta * d) * sig(beta * d / tau) for d in deltas]
    close(out.losses, want)
    close(out.chosen_rewards, [beta * v for v in ratios(C, RC)])  # rewards stay beta * log-ratio


def test_alpha_divergence_at_one_and_reverse_kl_are_plain_dpo():
    base = run("sigmoid", beta=0.1).losses
    assert torch.equal(run("sigmoid", beta=0.1, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0).losses, base)
    assert torch.equal(run("sigmoid", beta=0.1, f_divergence_type="reverse_kl").losses, base)


def test_f_divergence_with_ipo_divides_the_scores_by_the_lengths():
    lengths = (torch.tensor(NC), torch.tensor(NR))
    out = run("ipo", beta=0.1, f_divergence_type="forward_kl", lengths=lengths)
    cr, rr_ = ratios(C, RC), ratios(R, RR)
    want = [(f_scores(a, "forward_kl") / nc - f_scores(b, "forward_kl") / nr - 5.0) ** 2
            for a, b, nc, nr in zip(cr, rr_, NC, NR)]
    close(out.losses, want)
    # reverse_kl with lengths == ipo on per-token-average log-probs (the older call)
    avg = [[v / n for v, n in zip(xs, ns)] for xs, ns in ((C, NC), (R, NR), (RC, NC), (RR, NR))]
    old = dpo_loss(*(t(x) for x in avg), beta=0.1, loss_type="ipo")
    close(run("ipo", beta=0.1, lengths=lengths).losses, old.losses.tolist())


def test_f_divergence_refuses_loss_types_it_does_not_generalise():
    with pytest.raises(ValueError, match="bco_pair"):
        run("bco_pair", f_divergence_type="js_divergence")


def test_combined_loss_sums_weighted_parts_exactly():
    kw = dict(beta=0.1, lengths=(torch.tensor(NC), torch.tensor(NR)), chosen_nll=torch.tensor(NLL, dtype=torch.float64))
    out = combined_dpo_loss(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], t(C), t(R), t(RC), t(RR), **kw)
    parts = {k: dpo_loss(t(C), t(R), t(RC), t(RR), loss_type=k, **kw).losses.mean().item() for k in ("sigmoid", "bco_pair", "sft")}
    assert {k: v.item() for k, v in out.parts.items()} == pytest.approx(parts, abs=1e-12)
    assert out.loss.item() == pytest.approx(0.8 * parts["sigmoid"] + 0.2 * parts["bco_pair"] + NLL, abs=1e-12)
    # one part with weight 1 is the plain loss
    single = combined_dpo_loss(["sigmoid"], [1.0], t(C), t(R), t(RC), t(RR), beta=0.1)
    assert single.loss.item() == pytest.approx(sum(expected("sigmoid", 0.1)) / 3, abs=1e-12)
    # RPO = sigmoid + alpha * NLL; alpha = 0 is plain DPO
    rpo = combined_dpo_loss(["sigmoid", "sft"], [1.0, 0.0], t(C), t(R), t(RC), t(RR), **kw)
    assert rpo.loss.item() == pytest.approx(single.loss.item(), abs=1e-12)


def test_wpo_weights_multiply_every_part():
    ac, ar = [-0.5, -1.0, -0.2], [-0.3, -2.0, -0.1]  # per-token means of log p - log sum p^2
    w = wpo_weights(t(ac), t(ar))
    close(w, [math.exp(a) * math.exp(b) for a, b in zip(ac, ar)])  # no clamp at 1 (TRL 1.16.0)
    out = combined_dpo_loss(["sigmoid", "hinge"], [1.0, 0.5], t(C), t(R), t(RC), t(RR), beta=0.1, pair_weights=w)
    want = sum(l * wi for l, wi in zip(expected("sigmoid", 0.1), w.tolist())) / 3
    want += 0.5 * sum(l * wi for l, wi in zip(expected("hinge", 0.1), w.tolist())) / 3
    assert out.loss.item() == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError, match="aot"):
        combined_dpo_loss(["aot"], [1.0], t(C), t(R), t(RC), t(RR), pair_weights=w)


def token_out(lengths, values):
    """A TokenLogps of sequences with ``lengths`` label tokens holding ``values`` in order."""
    from alignctl.models.logps import TokenLogps

    idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    logps = t(values)
    return TokenLogps(
        sum_logps=torch.zeros(len(lengths), dtype=torch.float64).index_add(0, idx, logps),
        num_tokens=torch.tensor(lengths),
        logits_sum=torch.zeros(len(lengths)),
        token_logps=logps,
        token_batch_idx=idx,
        token_pos_idx=torch.cat([torch.arange(n) + 1 for n in lengths]),
    )


def test_ld_dpo_weights_the_longer_answers_tail():
    from alignctl.algos.dpo_terms import ld_logps

    # pairs: (chosen 3 tokens, rejected 1), (chosen 2, rejected 4); rows = chosen..., rejected...
    vals = [-1.0, -2.0, -3.0, -0.5, -0.25, -4.0, -1.5, -2.5, -3.5, -4.5]
    out = token_out([3, 2, 1, 4], vals)
    a = 0.3
    want = [-1.0 + a * (-2.0 - 3.0), -0.5 - 0.25, -4.0, -1.5 - 2.5 + a * (-3.5 - 4.5)]
    close(ld_logps(out, a), want, tol=1e-12)
    close(ld_logps(out, 1.0), out.sum_logps.tolist(), tol=1e-12)  # alpha = 1: plain sums
    close(ld_logps(out, 0.0), [-1.0, -0.75, -4.0, -4.0], tol=1e-12)  # alpha = 0: shared part only
    equal = token_out([2, 2], [-1.0, -2.0, -3.0, -4.0])  # equal lengths: nothing to weight
    close(ld_logps(equal, 0.1), [-3.0, -7.0], tol=1e-12)
