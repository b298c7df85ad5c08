"""The input embedding's gradient added row by row into a tied LM head's gradient.

When the input embedding and the LM head share one weight (SmolLM2, Qwen2.5-0.5B, Gemma, ...), the
weight's gradient is the head's dense ``[V, H]`` gradient plus the embedding's, whose only non-zero
rows are the batch's tokens. A stock embedding backward still builds a dense ``[V, H]`` tensor, at the
very end of backward when every other gradient already exists: one more vocabulary-sized buffer on the
peak. (A sparse embedding gradient does not help: autograd adds a sparse gradient into a dense one out
of place, which allocates the same buffer.)

Here the embedding's backward keeps its ``(token ids, row gradients)`` instead, and a hook that runs
once the weight's gradient is stored (after the head's, since the weight's gradient is stored only
when both uses are done) adds them in place with ``index_add_``. Same sum, no second buffer.

Only for a single process: DDP and FSDP reduce the stored gradient from their own hooks, which must
see the whole of it.
"""

from __future__ import annotations

import types
from typing import List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F


def defer_tied_embedding_grad(causal_lm: nn.Module) -> bool:
    """Route the embedding's gradient through the hook when it applies (a trainable plain ``nn.Embedding``
    whose weight is the LM head's, with no max-norm or frequency scaling); True when it was set up."""
    get_in = getattr(causal_lm, "get_input_embeddings", None)
    get_out = getattr(causal_lm, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return False
    embedding, head = get_in(), get_out()
    if (
        type(embedding) is not nn.Embedding
        or head is None
        or embedding.max_norm is not None
        or embedding.scale_grad_by_freq
        or embedding.sparse
    ):
        return False
    weight = embedding.weight
    if weight is not getattr(head, "weight", None) or not weight.requires_grad:
        return False
    pending: List[Tuple[torch.Tensor, torch.Tensor]] = []
    padding_idx = embedding.padding_idx

    def forward(self: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return _EmbeddingRows.apply(ids, self.weight, padding_idx, pending)
        return F.embedding(ids, self.weight, padding_idx)

    def add_rows(weight: torch.Tensor) -> None:
        if not pending:
            return
        if weight.grad is None:  # a backward pass that did not reach the head
            weight.grad = torch.zeros_like(weight)
        for ids, grad in pending:
            rows, values = ids.reshape(-1), grad.reshape(-1, weight.shape[1])
            if padding_idx is not None:  # the padding row gets no gradient, as in F.embedding
                keep = rows != padding_idx
                rows, values = rows[keep], values[keep]
            weight.grad.index_add_(0, rows, values.to(weight.grad.dtype))
        pending.clear()

    embedding.forward = types.MethodType(forward, embedding)
    weight.register_post_accumulate_grad_hook(add_rows)
    return True


class _EmbeddingRows(torch.autograd.Function):
    """``F.embedding`` whose backward hands the rows' gradients to ``pending`` instead of returning a
    dense weight gradient."""

    @staticmethod
    def forward(ctx, ids, weight, padding_idx: Optional[int], pending):
        ctx.save_for_backward(ids)
        ctx.pending = pending
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        ctx.pending.append((ids, grad))
        return None, None, None, None
