"""Per-sequence quantities the DPO options need from the token log-probs of a pair batch
(rows ``0..B-1`` chosen, ``B..2B-1`` rejected; padded or padding-free, one entry per sequence).

- :func:`ld_logps`: LD-DPO (Liu et al. 2024), as TRL 1.16.0 (added in 0.18): the tokens of the
  longer answer beyond the shorter one's length count ``ld_alpha`` times. TRL 1.16.0 weights the
  reference log-probs the same way (0.18-0.2x weighted the policy's only).
- :func:`wpo_pair_weights`: WPO (Zhou et al. 2024), as TRL 1.16.0 (added in 0.12).
- :func:`chosen_nll`: the NLL term of RPO / MPO's ``sft`` part.
"""

from __future__ import annotations

import torch

from alignctl.algos.preference import split_pairs
from alignctl.losses.dpo import wpo_weights
from alignctl.models.logps import TokenLogps


def token_ranks(out: TokenLogps) -> torch.Tensor:
    """[N] 0-based index of each label token within its sequence (tokens come grouped by sequence,
    in order, on both the padded and the padding-free path)."""
    counts = out.num_tokens.to(out.token_batch_idx.device)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(out.token_batch_idx.numel(), device=counts.device) - starts[out.token_batch_idx]


def ld_logps(out: TokenLogps, alpha: float) -> torch.Tensor:
    """[2B] ``shared + alpha * tail`` log-probs: ``shared`` sums each answer's first
    ``min(len_chosen, len_rejected)`` tokens, ``tail`` the rest (only the longer answer has one)."""
    if out.token_logps is None:
        raise ValueError("LD-DPO needs the per-token log-probs of the batch")
    chosen_n, rejected_n = split_pairs(out.num_tokens)
    shared = torch.minimum(chosen_n, rejected_n).repeat(2).to(out.token_batch_idx.device)
    in_tail = token_ranks(out) >= shared[out.token_batch_idx]
    weights = torch.ones_like(out.token_logps).masked_fill(in_tail, alpha)
    return out.sum_logps.new_zeros(out.sum_logps.shape[0]).index_add(
        0, out.token_batch_idx, out.token_logps * weights
    )


def wpo_pair_weights(out: TokenLogps) -> torch.Tensor:
    """[B] detached WPO weights from the policy's length-normalised ``log p - log sum_v p(v)^2``."""
    if out.log_sum_sq is None:
        raise ValueError("WPO weights need the model output's log_sum_sq (CausalLMWithLogps(log_sum_sq=True))")
    aligned = (out.sum_logps.detach() - out.log_sum_sq) / out.num_tokens.clamp(min=1).to(out.sum_logps.dtype)
    chosen, rejected = split_pairs(aligned)
    return wpo_weights(chosen, rejected)


def chosen_nll(out: TokenLogps) -> torch.Tensor:
    """Mean NLL over the chosen answers' tokens of the batch (cross-entropy on the chosen half)."""
    chosen_sum, _ = split_pairs(out.sum_logps)
    chosen_n, _ = split_pairs(out.num_tokens)
    return -chosen_sum.sum() / chosen_n.sum().clamp(min=1).to(chosen_sum.dtype)
