"""The fused LM-head log-prob path: values and gradients against the formulas, written out by hand in
fp64, and against the generic autograd path; bf16 autocast; which heads take it."""

import pytest
import torch
from torch import nn

from alignctl.models.head_logps import fused_head_applies, head_label_logps
from alignctl.models.logps import _generic_head_logps


def by_hand(h, weight, bias, targets, temperature, g):
    """logp_i = z_i[t_i] / T - logsumexp(z_i / T) with z = h W^T + b; gradients of sum_i g_i logp_i:
    d/dz_i = g_i (onehot(t_i) - softmax(z_i / T)) / T, then dW = dz^T h, db = sum_i dz_i, dh = dz W."""
    h, weight, g = h.double(), weight.double(), g.double()
    z = h @ weight.T + (bias.double() if bias is not None else 0.0)
    scaled = z / temperature
    lse = scaled.exp().sum(-1).log()
    logp = scaled[torch.arange(len(targets)), targets] - lse
    p = (scaled - lse[:, None]).exp()
    onehot = torch.zeros_like(p)
    onehot[torch.arange(len(targets)), targets] = 1.0
    dz = g[:, None] * (onehot - p) / temperature
    return logp, z.mean(-1), dz @ weight, dz.T @ h, dz.sum(0)


def fused_run(h, head, targets, temperature, chunk, g, autocast=False):
    h = h.detach().clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logp, mean = head_label_logps(h, head, targets, temperature, chunk)
    (logp * g).sum().backward()
    bias_grad = head.bias.grad if head.bias is not None else None
    return logp.detach(), mean, h.grad, head.weight.grad, bias_grad


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_values_and_gradients_equal_the_formulas(temperature, bias, chunk):
    torch.manual_seed(0)
    head = nn.Linear(12, 37, bias=bias)
    h, targets, g = torch.randn(9, 12), torch.randint(0, 37, (9,)), torch.randn(9)
    got = fused_run(h, head, targets, temperature, chunk, g)
    want = by_hand(h, head.weight.detach(), head.bias.detach() if bias else None, targets, temperature, g)
    for name, a, b in zip(["logp", "vocab mean", "d hidden", "d weight", "d bias"], got, want):
        if b is None or not bias and name == "d bias":
            continue
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6, msg=name)
    assert not got[1].requires_grad  # the vocab mean is a metric


def test_equals_the_generic_path_with_large_logits():
    torch.manual_seed(1)
    head = nn.Linear(8, 50)
    with torch.no_grad():
        head.weight.mul_(40)  # logits in the hundreds: the log-sum-exp must subtract the row maximum
    h, targets, g = torch.randn(7, 8), torch.randint(0, 50, (7,)), torch.randn(7)
    fused = fused_run(h, head, targets, 1.0, 3, g)
    hh = h.clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    logp, mean, _ = _generic_head_logps(hh, targets, head, None, 1.0, 3, False)
    (logp * g).sum().backward()
    assert torch.isfinite(fused[0]).all()
    for a, b in zip(fused, (logp.detach(), mean, hh.grad, head.weight.grad, head.bias.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_frozen_head_gets_no_gradient_and_hidden_still_does():
    torch.manual_seed(2)
    head = nn.Linear(6, 20, bias=False).requires_grad_(False)
    h, targets, g = torch.randn(5, 6), torch.randint(0, 20, (5,)), torch.randn(5)
    _, _, d_hidden, d_weight, _ = fused_run(h, head, targets, 1.0, 2, g)
    assert d_weight is None
    torch.testing.assert_close(d_hidden.double(), by_hand(h, head.weight, None, targets, 1.0, g)[2], rtol=1e-5, atol=1e-6)


def test_bf16_autocast_is_as_close_to_fp32_as_the_generic_path():
    """The matmuls run in bf16 (as autocast's linear does); softmax and the weight gradient's sum in fp32."""
    torch.manual_seed(3)
    head = nn.Linear(64, 500)
    h, targets, g = torch.randn(40, 64), torch.randint(0, 500, (40,)), torch.randn(40)
    exact = fused_run(h, head, targets, 1.0, 16, g)
    fused = fused_run(h, head, targets, 1.0, 16, g, autocast=True)

    hh = h.clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, _, _ = _generic_head_logps(hh, targets, head, None, 1.0, 16, False)
    (logp * g).sum().backward()
    generic = (logp.detach(), None, hh.grad, head.weight.grad, head.bias.grad)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert fused[3].dtype == torch.float32  # the fp32 master weight's gradient
    for i in (0, 2, 3, 4):
        assert rel(fused[i], exact[i]) < 1e-2
        assert rel(fused[i], exact[i]) <= 1.2 * rel(generic[i], exact[i]) + 1e-6
    assert rel(fused[0], exact[0]) > 0  # it did run in bf16


def test_which_heads_take_the_fused_path():
    class Scaled(nn.Linear):
        pass

    assert fused_head_applies(nn.Linear(4, 8))
    assert not fused_head_applies(Scaled(4, 8))  # a subclass (quantized, ...) may compute otherwise
    zero3 = nn.Linear(4, 8)
    zero3.weight.ds_id = 7  # a DeepSpeed ZeRO-3 partition: only its own forward gathers it
    assert not fused_head_applies(zero3)

    from peft import LoraConfig, get_peft_model

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(4, 8)

    lora = get_peft_model(Tiny(), LoraConfig(target_modules=["lm_head"], r=2))
    assert not fused_head_applies(lora.base_model.model.lm_head)
