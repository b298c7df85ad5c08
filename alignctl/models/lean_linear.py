"""Linear layers that keep no half copy of their weight for backward under autocast.

Under bf16/fp16 autocast a linear layer casts its fp32 weight to the half type, and autograd keeps
that cast until the layer's backward: a half copy of every weight lives from the forward to the
backward (269 MB for SmolLM2-135M, 14 GB for a 7B model). Here the layer keeps a reference to its
fp32 weight instead (memory it holds anyway) and casts it again in backward. The forward and the
gradients are the same computations in the same types as autocast's (the cast is exact and
deterministic); the price is one extra cast of each weight per backward.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


class _RecastLinear(torch.autograd.Function):
    """``F.linear`` in ``dtype`` on a half cast of ``x``, ``weight`` and ``bias``, keeping for
    backward the half input (as autocast's linear does) and the fp32 weight (not its cast)."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        with torch.autocast(x.device.type, enabled=False):
            x_half = x.to(dtype)
            out = F.linear(x_half, weight.to(dtype), None if bias is None else bias.to(dtype))
        ctx.save_for_backward(x_half, weight)
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_half, weight = ctx.saved_tensors
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_2d.mm(weight.to(grad_out.dtype)).reshape(*grad_out.shape[:-1], -1).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            # the same product autograd forms for mm's second operand, transposed back
            grad_w = x_half.reshape(-1, x_half.shape[-1]).t().mm(grad_2d).t().to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = grad_2d.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None


def _lean_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    device = x.device.type
    if (
        torch.is_grad_enabled()
        and torch.is_autocast_enabled(device)
        and self.weight.dtype == torch.float32
        and x.dtype in (torch.float32, torch.get_autocast_dtype(device))
    ):
        return _RecastLinear.apply(x, self.weight, self.bias, torch.get_autocast_dtype(device))
    return F.linear(x, self.weight, self.bias)


def use_lean_linears(model: nn.Module) -> int:
    """Give every plain ``nn.Linear`` of ``model`` except the output head the lean forward; returns
    how many. The head is left to autocast, whose cast is cached for all of a forward's log-prob
    chunks (re-casting it per chunk costs more than its copy saves)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear and module is not head:
            module.forward = types.MethodType(_lean_forward, module)
            count += 1
    return count
