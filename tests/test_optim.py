"""The optimizer: fused AdamW where torch has a kernel for the parameters, the loop otherwise;
weight decay only on matrices."""

import torch
from omegaconf import OmegaConf

from alignctl.engine.optim import build_optimizer

CFG = OmegaConf.create({"lr": 1e-3, "weight_decay": 0.1, "adam_beta1": 0.9, "adam_beta2": 0.99, "adam_epsilon": 1e-6})


def test_fused_adamw_on_cpu_with_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = build_optimizer(model, CFG)
    assert opt.defaults["fused"] is True
    decay, no_decay = opt.param_groups
    assert [p.ndim for p in decay["params"]] == [2] and decay["weight_decay"] == 0.1
    assert {p.ndim for p in no_decay["params"]} == {1} and no_decay["weight_decay"] == 0.0
    assert (opt.defaults["betas"], opt.defaults["eps"]) == ((0.9, 0.99), 1e-6)


def test_fused_and_loop_adamw_agree_to_rounding():
    torch.manual_seed(0)
    a = torch.nn.Linear(64, 32)
    b = torch.nn.Linear(64, 32)
    b.load_state_dict(a.state_dict())
    start = a.weight.detach().clone()
    fused, loop = build_optimizer(a, CFG), torch.optim.AdamW(
        [{"params": [b.weight], "weight_decay": 0.1}, {"params": [b.bias], "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.99), eps=1e-6)
    for step in range(5):
        x = torch.randn(8, 64)
        for model, opt in ((a, fused), (b, loop)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    assert torch.allclose(a.weight, b.weight, rtol=0, atol=1e-6)
    assert (a.weight - start).abs().max() > 1e-3  # the steps moved the weights: the agreement means something


def test_parameters_without_a_fused_kernel_get_the_loop(monkeypatch):
    real = torch.optim.AdamW

    def no_fused(params, **kwargs):
        if kwargs.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", no_fused)
    opt = build_optimizer(torch.nn.Linear(2, 2), CFG)
    assert not opt.defaults.get("fused")
