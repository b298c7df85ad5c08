"""Lean linears under autocast: the same outputs and gradients as autocast's own linear (bit for
bit), without keeping a half copy of the weight for backward."""

import copy

import pytest
import torch

from alignctl.models.lean_linear import use_lean_linears


def grads_under_autocast(model, x):
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    (out.float() ** 2).mean().backward()
    return out.detach(), x.grad, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("bias", [True, False])
def test_outputs_and_gradients_equal_autocasts_linear(bias):
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(24, 40, bias=bias), torch.nn.GELU(), torch.nn.Linear(40, 8, bias=bias))
    lean = copy.deepcopy(plain)
    assert use_lean_linears(lean) == 2
    x = torch.randn(3, 7, 24)  # [batch, sequence, features], as in a transformer
    expected, got = grads_under_autocast(plain, x), grads_under_autocast(lean, x)
    assert expected[0].dtype == got[0].dtype == torch.bfloat16
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
    assert expected[2].keys() == got[2].keys()
    for name, grad in expected[2].items():
        assert got[2][name].dtype == torch.float32 and torch.equal(grad, got[2][name]), name


def test_no_half_weight_copy_is_kept_for_backward():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 64, bias=False)
    use_lean_linears(layer)
    kept = []

    def pack(tensor):
        kept.append(tensor)
        return tensor

    x = torch.randn(4, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    assert any(t is layer.weight for t in kept)  # the fp32 weight it holds anyway
    assert not any(t.dtype == torch.bfloat16 and t.shape == layer.weight.shape for t in kept)


def test_frozen_weights_fp32_and_no_grad_take_the_plain_path():
    layer = torch.nn.Linear(8, 8)
    use_lean_linears(layer)
    layer.requires_grad_(False)
    x = torch.randn(2, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().sum().backward()  # input gradient through a frozen weight (LoRA's base layers)
    assert x.grad is not None and out.dtype == torch.bfloat16
    assert layer(x).dtype == torch.float32  # no autocast: plain fp32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16  # inference: autocast's own path


def test_the_output_head_is_left_to_autocast(tiny_tokenizer):
    from alignctl.config import ArchConfig
    from alignctl.models.tiny import build_tiny_model

    model = build_tiny_model(ArchConfig(), tiny_tokenizer)
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert use_lean_linears(model) == len(linears) - 1
    assert "forward" not in vars(model.get_output_embeddings())
