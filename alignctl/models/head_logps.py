"""Label log-probs of a plain linear LM head, with a hand-written backward that keeps no logits.

For rows ``h`` [N, H] and a head ``W`` [V, H] (+ bias), the label log-prob of row ``i`` is
``z_i[t_i] / T - logsumexp(z_i / T)`` with ``z = h W^T + b``. Forward runs ``chunk_size`` rows at a time
and keeps only ``h``, the targets and one log-sum-exp per row. Backward recomputes a chunk's logits
and turns them into ``d logp / d z = (onehot - softmax) / T`` in place, so a chunk costs one
``[chunk, V]`` fp32 buffer and its low-precision copy. Compared with running the generic path under
``torch.utils.checkpoint`` (autograd's log-softmax, gather and matmul backward per chunk) it saves
the separate log-softmax, its gradient, the per-chunk recast of ``W`` to the autocast dtype (done
once per pass here) and a per-chunk ``[V, H]`` low-precision weight gradient: the weight gradient
is added into one fp32 buffer a vocabulary block at a time.

Under autocast the matmuls run in the autocast dtype and everything after them in fp32 (fp64
models stay fp64), exactly as the generic path does. :func:`fused_head_applies` says when this
path is used; otherwise :mod:`alignctl.models.logps` falls back to the generic one.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

# Bytes of low-precision weight-gradient block computed at a time before it is added in fp32.
_GRAD_BLOCK_BYTES = 8 << 20


def fused_head_applies(head: nn.Module) -> bool:
    """A plain ``nn.Linear`` (not a LoRA/quantized subclass) whose weight is an ordinary tensor
    (not a DeepSpeed ZeRO-3 partition, which only its own forward gathers)."""
    weight = getattr(head, "weight", None)
    return (
        type(head) is nn.Linear
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and weight.numel() > 0
        and not hasattr(weight, "ds_id")
    )


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: the autocast dtype when autocast is on for the weight's
    device and the weight is floating point, else the weight's own dtype."""
    device_type = weight.device.type
    if weight.is_floating_point() and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def head_label_logps(
    hidden: torch.Tensor,
    head: nn.Linear,
    targets: torch.Tensor,
    temperature: float,
    chunk_size: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``hidden`` [N, H], ``targets`` [N] -> (label log-probs [N], differentiable; the detached mean over
    the vocabulary of the untempered logits [N])."""
    dtype = compute_dtype(head.weight)
    return _LinearLabelLogps.apply(hidden, head.weight, head.bias, targets, float(temperature), int(chunk_size), dtype)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least fp32 (fp64 stays fp64): the dtype every log-softmax here runs in."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _logits(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    return upcast(F.linear(h, w, b))


class _LinearLabelLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            h_all = hidden.to(dtype)
            n = hidden.shape[0]
            out_dtype = torch.promote_types(dtype, torch.float32)
            logps = torch.empty(n, dtype=out_dtype, device=hidden.device)
            vocab_mean = torch.empty_like(logps)
            lse = torch.empty_like(logps)
            for start in range(0, n, chunk_size):
                rows = slice(start, start + chunk_size)
                z = _logits(h_all[rows], w, b)
                vocab_mean[rows] = z.mean(-1)
                if temperature != 1.0:
                    z.div_(temperature)
                target_z = z.gather(1, targets[rows].unsqueeze(1)).squeeze(1)
                top = z.amax(-1, keepdim=True)
                top = top.masked_fill(top.isinf(), 0.0)  # an all -inf row: as torch.logsumexp does
                lse[rows] = z.sub_(top).exp_().sum(-1).log_().add_(top.squeeze(1))
                logps[rows] = target_z - lse[rows]
                del z
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.settings = (temperature, chunk_size, dtype)
        ctx.mark_non_differentiable(vocab_mean)
        return logps, vocab_mean

    @staticmethod
    def backward(ctx, grad_logps, _grad_vocab_mean):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        temperature, chunk_size, dtype = ctx.settings
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            h_all = hidden.to(dtype)
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32)) if need_w else None
            grad_b = torch.zeros(weight.shape[0], dtype=lse.dtype, device=lse.device) if need_b else None
            scale = grad_logps.to(lse.dtype) / temperature  # d loss / d (z / T) per row, times 1/T for d z
            block = max(1, _GRAD_BLOCK_BYTES // (weight.shape[1] * w.element_size()))
            for start in range(0, hidden.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                h = h_all[rows]
                z = _logits(h, w, b)
                if temperature != 1.0:
                    z.div_(temperature)
                z.sub_(lse[rows].unsqueeze(1)).exp_()  # softmax
                z.mul_(-scale[rows].unsqueeze(1))
                z.scatter_add_(1, targets[rows].unsqueeze(1), scale[rows].unsqueeze(1))  # (onehot - p) * scale
                if need_b:
                    grad_b += z.sum(0)
                gz = z.to(dtype)
                del z
                if need_h:
                    grad_h[rows] = (gz @ w).to(hidden.dtype)
                if need_w:
                    _add_weight_grad(grad_w, gz, h, block)
                del gz
        if need_w and grad_w.dtype != weight.dtype:
            grad_w = grad_w.to(weight.dtype)
        if need_b and grad_b.dtype != bias.dtype:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def _add_weight_grad(grad_w: torch.Tensor, gz: torch.Tensor, h: torch.Tensor, block: int) -> None:
    """``grad_w += gz^T @ h``; in the buffer's own dtype directly, or a vocabulary block at a time
    when the matmul runs in a lower precision than the buffer."""
    if gz.dtype == grad_w.dtype:
        grad_w.addmm_(gz.t(), h)
        return
    for v0 in range(0, grad_w.shape[0], block):
        grad_w[v0 : v0 + block] += gz[:, v0 : v0 + block].t() @ h
