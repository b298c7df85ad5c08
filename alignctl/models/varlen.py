"""Padding-free attention: several sequences laid end to end in one row, attention never crossing them.

A padding-free batch is one row ``[1, N]`` holding every sequence of the batch back to back, with
position ids restarting at 0 for each and ``cu_seq_lens`` (``[S + 1]``, int32, the cumulative
sequence boundaries) beside it. The attention kernels take it as follows:

- ``flash_attention_2`` / ``flash_attention_3`` (GPU): transformers' varlen kernels read the
  ``cu_seq_lens_q/k`` and ``max_length_q/k`` keyword arguments directly.
- ``sdpa`` (CPU and GPU): transformers would build a block-diagonal ``[N, N]`` mask from the
  restarting position ids, which sends torch's SDPA to its slow masked kernel and spends
  ``N^2`` work on pairs that are masked out. :data:`VARLEN_SDPA` instead runs SDPA on each
  sequence's slice (causal for decoders: the fast ``is_causal`` kernel, ``sum(len^2)`` work);
  every other call (padded batches, generation, sliding-window layers) goes to transformers' own
  ``sdpa`` unchanged.
- ``eager``: transformers' block-diagonal mask from the position ids (correct, no speed-up).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

VARLEN_SDPA = "alignctl_varlen_sdpa"
NATIVE_VARLEN = ("flash_attention_2", "flash_attention_3")
SUPPORTED = ("sdpa", VARLEN_SDPA, "eager") + NATIVE_VARLEN

_registered = False


def _varlen_sdpa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """``query`` [1, H, N, D], ``key``/``value`` [1, H_kv, N, D] -> ([1, N, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    plain = query.shape[2] != key.shape[2] or getattr(module, "sliding_window", None) is not None
    if cu is None or query.shape[0] != 1 or plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    causal = getattr(module, "is_causal", True)  # encoders (BERT reward models) attend both ways
    bounds = cu.tolist()
    outs = [
        _sequence_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], causal, dropout, scaling, groups > 1)
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.transpose(1, 2).contiguous(), None


def bucketed_length(n: int) -> int:
    """``n`` rounded up to a multiple of max(64, its next power of two / 8): 64 apart up to 512,
    then 8 lengths an octave (20 up to 4,096), never more than a quarter longer (or 63 tokens)."""
    granule = max(64, (1 << (n - 1).bit_length()) // 8)
    return -(-n // granule) * granule


def _sequence_attention(q, k, v, causal: bool, dropout: float, scale, gqa: bool) -> torch.Tensor:
    """SDPA over one sequence ``[1, H, n, D]``.

    On a CPU in bf16/fp16, torch's fused kernel keeps a compiled kernel for every sequence length
    it meets and never frees it (about 5 MB each; 0.3 GB over 57 lengths, measured): a long run
    of padding-free batches would grow without bound. There the sequence is zero-padded to
    :func:`bucketed_length`, so few lengths ever reach the kernel. Real queries never see the
    extra keys (they come after them under a causal mask; a key mask hides them otherwise), and
    the extra queries' outputs are dropped."""
    n = q.shape[2]
    padded = bucketed_length(n) if _half_cpu_attention(q) else n
    mask = None
    if padded != n:
        q, k, v = (F.pad(t, (0, 0, 0, padded - n)) for t in (q, k, v))
        if not causal:
            mask = (torch.arange(padded, device=q.device) < n).view(1, 1, 1, padded)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale, is_causal=causal, enable_gqa=gqa
    )
    return out[:, :, :n]


def _half_cpu_attention(q: torch.Tensor) -> bool:
    """Whether SDPA on ``q`` runs the CPU kernel in bf16/fp16: half inputs, or fp32 ones (rotary
    embeddings promote queries and keys) that autocast casts down."""
    if q.device.type != "cpu":
        return False
    half = (torch.bfloat16, torch.float16)
    return q.dtype in half or (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in half)


def register_varlen_sdpa() -> None:
    """Make :data:`VARLEN_SDPA` a transformers attention implementation (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN_SDPA, _varlen_sdpa_forward)
    AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)
    _registered = True


def attn_implementation(model: torch.nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


def padding_free_support(model: torch.nn.Module) -> Tuple[bool, str]:
    """(whether ``model`` — a transformers causal LM, maybe under peft — can take padding-free
    batches, the kernel that would run them or why not)."""
    from alignctl.models.logps import unwrap_causal_lm

    try:
        causal_lm = unwrap_causal_lm(model)
    except Exception as exc:  # noqa: BLE001 - any unsupported wrapper is a reason to stay padded
        return False, str(exc)
    impl = attn_implementation(causal_lm)
    if getattr(causal_lm.config, "is_encoder_decoder", False):
        return False, "encoder-decoder models need their padded layout"
    if impl not in SUPPORTED:
        return False, f"attention implementation {impl!r} has no position-id masking (use sdpa or flash_attention_2)"
    return True, {"sdpa": "sdpa, one causal kernel per sequence", VARLEN_SDPA: "sdpa, one causal kernel per sequence",
                  "eager": "eager, block-diagonal mask"}.get(impl, f"{impl} varlen")


def enable_padding_free(model: torch.nn.Module) -> str:
    """Route ``model``'s sdpa attention through the per-sequence kernel; returns the kernel's description.

    Padded calls behave exactly as before (they fall through to transformers' sdpa)."""
    from alignctl.models.logps import unwrap_causal_lm

    ok, how = padding_free_support(model)
    if not ok:
        raise ValueError(how)
    route_sdpa_per_sequence(unwrap_causal_lm(model))
    return how


def route_sdpa_per_sequence(model: torch.nn.Module) -> None:
    """Switch a transformers model using ``sdpa`` to :data:`VARLEN_SDPA` (other kernels unchanged)."""
    if attn_implementation(model) == "sdpa":
        register_varlen_sdpa()
        model.set_attn_implementation(VARLEN_SDPA)


def varlen_kwargs(cu_seq_lens: Optional[torch.Tensor]) -> Dict[str, object]:
    """Keyword arguments that carry the sequence boundaries of a padding-free row to the attention."""
    if cu_seq_lens is None:
        return {}
    cu = cu_seq_lens.to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
