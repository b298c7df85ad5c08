"""Memory-lean per-sequence log-probabilities of label tokens.

Every training algorithm needs, for each sequence of a batch, the sum of ``log p(label_t | tokens_<t)``
over its label positions (``labels != -100``). The naive way, ``model(...).logits.float().log_softmax(-1)``,
materialises ``[batch, seq, vocab]`` logits in fp32 (several copies, once more for backward). With a 49k-150k
vocabulary that dominates peak memory.

:func:`sequence_logps` instead runs only the decoder, gathers the hidden states of the positions that predict a
label, and applies the LM head to at most ``chunk_size`` of them at a time: fp32 log-softmax per chunk, keep only
the label token's log-prob. When gradients are enabled each chunk's head + log-softmax + gather runs under
``torch.utils.checkpoint`` so backward re-computes one chunk's logits at a time instead of keeping all of them.

:func:`plain_sequence_logps` is the naive reference with identical outputs (tests, benchmark).

Conventions shared by both paths:

* ``labels`` is aligned with ``input_ids``; the shift (token ``t`` is predicted from position ``t - 1``) is done here.
* When ``position_ids`` are given, a label at a position whose position id is 0 (the first token of a sequence, e.g.
  the start of each example of a packed row) is ignored: it would be predicted from the previous example.
* Log-softmax runs in at least fp32 (fp64 models stay fp64), after dividing by ``temperature``.
* ``logits_sum`` uses the model's own logits (what ``model(...).logits`` returns, i.e. after soft-capping /
  scaling, before ``temperature``), upcast to at least fp32, detached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from alignctl.errors import ModelLoadError

IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "TokenLogps",
    "sequence_logps",
    "plain_sequence_logps",
    "CausalLMWithLogps",
    "token_nll",
    "unwrap_causal_lm",
]


@dataclass
class TokenLogps:
    """Per-sequence log-prob results for a batch of ``B`` rows.

    Attributes:
        sum_logps: ``[B]`` sum of label-token log-probs over positions with ``label != -100`` (differentiable).
        num_tokens: ``[B]`` long, number of such positions.
        logits_sum: ``[B]`` detached, sum over those positions of the mean over the vocabulary of the logits.
            TRL's ``logits/chosen`` metric is ``logits_sum.sum() / num_tokens.sum()``.
        token_logps: ``[N]`` (optional) the per-token log-probs (differentiable), ``N = num_tokens.sum()``, in
            row-major order of ``(batch, position)``.
        token_batch_idx / token_pos_idx: ``[N]`` (optional) long, row and *label* position (index into ``labels``)
            of each entry of ``token_logps``.
        seq_len: length ``T`` of the rows (for :meth:`per_token_logps`).
    """

    sum_logps: torch.Tensor
    num_tokens: torch.Tensor
    logits_sum: torch.Tensor
    token_logps: torch.Tensor | None = None
    token_batch_idx: torch.Tensor | None = None
    token_pos_idx: torch.Tensor | None = None
    seq_len: int | None = None

    @property
    def mean_logps(self) -> torch.Tensor:
        """``[B]`` mean label log-prob per row (rows without labels give 0)."""
        return self.sum_logps / self.num_tokens.clamp(min=1).to(self.sum_logps.dtype)

    def per_token_logps(self) -> torch.Tensor:
        """``[B, T]`` label-token log-probs aligned with ``labels`` (0 where the label is ignored), differentiable."""
        if self.token_logps is None or self.seq_len is None:
            raise ValueError("per-token log-probs were not kept for this result")
        out = self.token_logps.new_zeros(self.sum_logps.shape[0], self.seq_len)
        return out.index_put((self.token_batch_idx, self.token_pos_idx), self.token_logps)

    def per_token_mask(self) -> torch.Tensor:
        """``[B, T]`` bool, True where :meth:`per_token_logps` holds a label log-prob."""
        if self.token_batch_idx is None or self.seq_len is None:
            raise ValueError("per-token log-probs were not kept for this result")
        mask = torch.zeros(
            self.sum_logps.shape[0], self.seq_len, dtype=torch.bool, device=self.sum_logps.device
        )
        mask[self.token_batch_idx, self.token_pos_idx] = True
        return mask

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (for ``nn.Module.forward`` outputs seen by DDP / FSDP / accelerate)."""
        out = {"sum_logps": self.sum_logps, "num_tokens": self.num_tokens, "logits_sum": self.logits_sum}
        if self.token_logps is not None:
            out["token_logps"] = self.token_logps
            out["token_batch_idx"] = self.token_batch_idx
            out["token_pos_idx"] = self.token_pos_idx
        return out

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor], seq_len: int | None = None) -> "TokenLogps":
        return cls(
            sum_logps=d["sum_logps"],
            num_tokens=d["num_tokens"],
            logits_sum=d["logits_sum"],
            token_logps=d.get("token_logps"),
            token_batch_idx=d.get("token_batch_idx"),
            token_pos_idx=d.get("token_pos_idx"),
            seq_len=seq_len,
        )


def token_nll(out: TokenLogps) -> torch.Tensor:
    """SFT loss: mean negative log-likelihood over all label tokens of the batch (0-safe when there are none)."""
    return -out.sum_logps.sum() / out.num_tokens.sum().clamp(min=1).to(out.sum_logps.dtype)


# --------------------------------------------------------------------------------------------------------------
# model plumbing
# --------------------------------------------------------------------------------------------------------------


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """Return the transformers causal LM inside ``model`` (a PreTrainedModel or a peft ``PeftModel``).

    LoRA layers are injected in place, so running the returned model's decoder runs them (and honours
    ``peft_model.disable_adapter()``). Prompt-learning adapters (prefix/prompt tuning) live in the ``PeftModel``
    forward and are not supported. DDP/FSDP-wrapped modules are refused: wrap the model in
    :class:`CausalLMWithLogps` *before* ``accelerator.prepare`` instead.
    """
    if isinstance(model, CausalLMWithLogps):
        model = model.model
    if isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ in (
        "FullyShardedDataParallel",
    ):
        raise TypeError(
            "sequence_logps got a DDP/FSDP-wrapped model; calling its submodules would bypass the wrapper. "
            "Wrap the model in CausalLMWithLogps and give that module to accelerator.prepare."
        )
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        PeftModel = ()
    if PeftModel and isinstance(model, PeftModel):
        cfg = model.peft_config[model.active_adapter]
        if getattr(cfg, "is_prompt_learning", False):
            raise ModelLoadError(
                f"the lean log-prob path does not support prompt-learning peft adapters ({cfg.peft_type}); "
                "use a LoRA-style adapter"
            )
        model = model.get_base_model()
    return model


def _decoder_and_head(causal_lm: nn.Module) -> tuple[nn.Module, nn.Module]:
    decoder = causal_lm.get_decoder()
    head = causal_lm.get_output_embeddings()
    if head is None or decoder is None or decoder is causal_lm:
        raise ModelLoadError(
            f"{type(causal_lm).__name__} does not expose a decoder and an LM head "
            "(get_decoder()/get_output_embeddings()); it is not a supported causal LM"
        )
    return decoder, head


_SCALE_ATTRS = ("logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier")


def _logits_postprocess(causal_lm: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What the model's forward does to ``lm_head(hidden)`` before returning logits (None = nothing)."""
    config = causal_lm.config
    model_type = getattr(config, "model_type", "") or ""
    mult: float | None = None
    div: float | None = None
    if model_type.startswith("cohere"):
        mult = getattr(causal_lm, "logit_scale", None)
        if mult is None:
            mult = getattr(config, "logit_scale", None)
    elif model_type.startswith("granite") and not model_type.startswith("granite_speech"):
        div = getattr(config, "logits_scaling", None)
    elif model_type == "hyperclovax":
        mult = getattr(config, "logits_scaling", None)  # MuP: multiplies (granite divides)
    elif model_type == "falcon_h1":
        mult = getattr(getattr(causal_lm, "model", None), "lm_head_multiplier", None)
    else:
        for attr in _SCALE_ATTRS:
            value = getattr(config, attr, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and float(value) != 1.0:
                raise ModelLoadError(
                    f"the lean log-prob path does not know how model_type {model_type!r} applies "
                    f"config.{attr}={value} to its logits; add it to alignctl.models.logps._logits_postprocess"
                )
    if mult is not None and not isinstance(mult, (int, float)):
        raise ModelLoadError(f"model_type {model_type!r}: non-scalar logit scale {type(mult).__name__}")
    if div is not None and not isinstance(div, (int, float)):
        raise ModelLoadError(f"model_type {model_type!r}: non-scalar logits_scaling {type(div).__name__}")
    cap = getattr(config, "final_logit_softcapping", None)

    if mult in (None, 1, 1.0):
        mult = None
    if div in (None, 1, 1.0):
        div = None
    if mult is None and div is None and cap is None:
        return None

    def post(logits: torch.Tensor) -> torch.Tensor:
        if mult is not None:
            logits = logits * mult
        if div is not None:
            logits = logits / div
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return post


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _effective_labels(labels: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """Labels with the first token of every sequence (position id 0) ignored."""
    if position_ids is None:
        return labels
    starts = (position_ids == 0).expand_as(labels)
    return labels.masked_fill(starts, IGNORE_INDEX)


def _check_inputs(input_ids, attention_mask, labels, position_ids, temperature) -> None:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
    if position_ids is not None and position_ids.shape[-1] != input_ids.shape[-1]:
        raise ValueError(f"position_ids {tuple(position_ids.shape)} must match input_ids {tuple(input_ids.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


# --------------------------------------------------------------------------------------------------------------
# lean path
# --------------------------------------------------------------------------------------------------------------


def _chunk_logps(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: nn.Module,
    post: Callable[[torch.Tensor], torch.Tensor] | None,
    temperature: float,
    with_entropy: bool = False,
):
    """``hidden`` [n, H], ``targets`` [n] -> (label log-probs [n], vocab-mean of logits [n]), plus the
    detached entropy [n] of the tempered distribution when ``with_entropy`` (online RL metrics)."""
    logits = head(hidden)
    if post is not None:
        logits = post(logits)
    logits = _upcast(logits)
    vocab_mean = logits.detach().mean(-1)
    if temperature != 1.0:
        logits = logits / temperature
    all_logps = logits.log_softmax(-1)
    logps = all_logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logps, vocab_mean
    detached = all_logps.detach()
    return logps, vocab_mean, -(detached.exp() * detached).sum(-1)


def sequence_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    chunk_size: int = 1024,
    temperature: float = 1.0,
) -> TokenLogps:
    """Per-sequence label log-probs without materialising ``[batch, seq, vocab]`` logits.

    ``model`` is a transformers causal LM or a peft ``PeftModel`` around one. ``labels`` is aligned with
    ``input_ids`` (-100 = ignore). For packed rows pass ``attention_mask=None`` and ``position_ids`` restarting at 0
    for each example: transformers then builds a block-diagonal causal mask.
    """
    _check_inputs(input_ids, attention_mask, labels, position_ids, temperature)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    causal_lm = unwrap_causal_lm(model)
    decoder, head = _decoder_and_head(causal_lm)
    post = _logits_postprocess(causal_lm)

    out = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    )
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # [B, T, H]
    B, T = input_ids.shape

    labels = _effective_labels(labels, position_ids)
    shifted = labels[:, 1:]  # label at t+1 is predicted from hidden at t
    mask = shifted != IGNORE_INDEX  # [B, T-1]
    batch_idx, pos_idx = mask.nonzero(as_tuple=True)  # row-major order
    n = batch_idx.numel()

    num_tokens = mask.sum(-1)
    if n == 0:
        # Keep the graph connected to every parameter (DDP, loss.backward()) with an exact zero.
        batch_idx = pos_idx = torch.zeros(1, dtype=torch.long, device=input_ids.device)
        targets = torch.zeros(1, dtype=torch.long, device=input_ids.device)
        weight = 0.0
    else:
        targets = shifted[batch_idx, pos_idx]
        weight = None
    if targets.numel() and (targets.min() < 0):
        raise ValueError("labels must be token ids >= 0 or -100")
    h_sel = hidden[batch_idx, pos_idx]  # [N, H]

    use_ckpt = torch.is_grad_enabled()
    logps_chunks, mean_chunks = [], []
    for start in range(0, h_sel.shape[0], chunk_size):
        h = h_sel[start : start + chunk_size]
        t = targets[start : start + chunk_size]
        if use_ckpt:
            lp, vm = checkpoint(_chunk_logps, h, t, head, post, temperature, use_reentrant=False)
        else:
            lp, vm = _chunk_logps(h, t, head, post, temperature)
        logps_chunks.append(lp)
        mean_chunks.append(vm)
    token_logps = torch.cat(logps_chunks) if len(logps_chunks) > 1 else logps_chunks[0]
    vocab_mean = (torch.cat(mean_chunks) if len(mean_chunks) > 1 else mean_chunks[0]).detach()

    if weight is not None:
        token_logps = token_logps * weight
        vocab_mean = vocab_mean * weight
    sum_logps = token_logps.new_zeros(B).index_add(0, batch_idx, token_logps)
    logits_sum = vocab_mean.new_zeros(B).index_add(0, batch_idx, vocab_mean)
    if n == 0:
        token_logps = token_logps[:0]
        batch_idx = pos_idx = batch_idx[:0]
    return TokenLogps(
        sum_logps=sum_logps,
        num_tokens=num_tokens,
        logits_sum=logits_sum,
        token_logps=token_logps,
        token_batch_idx=batch_idx,
        token_pos_idx=pos_idx + 1,
        seq_len=T,
    )


# --------------------------------------------------------------------------------------------------------------
# reference path
# --------------------------------------------------------------------------------------------------------------


def plain_sequence_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    chunk_size: int = 1024,  # unused; same signature as sequence_logps
    temperature: float = 1.0,
) -> TokenLogps:
    """Naive reference: full ``model(...).logits`` -> fp32 log-softmax -> gather. Same outputs as
    :func:`sequence_logps`, with ``[batch, seq, vocab]`` fp32 logits in memory."""
    del chunk_size
    _check_inputs(input_ids, attention_mask, labels, position_ids, temperature)
    kwargs = {"position_ids": position_ids} if position_ids is not None else {}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits
    logits = _upcast(logits)[:, :-1]  # [B, T-1, V]
    labels = _effective_labels(labels, position_ids)
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    safe = shifted.masked_fill(~mask, 0)
    scaled = logits / temperature if temperature != 1.0 else logits
    per_token = scaled.log_softmax(-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # [B, T-1]
    per_token = per_token * mask
    batch_idx, pos_idx = mask.nonzero(as_tuple=True)
    return TokenLogps(
        sum_logps=per_token.sum(-1),
        num_tokens=mask.sum(-1),
        logits_sum=(logits.detach().mean(-1) * mask).sum(-1),
        token_logps=per_token[batch_idx, pos_idx],
        token_batch_idx=batch_idx,
        token_pos_idx=pos_idx + 1,
        seq_len=input_ids.shape[1],
    )


# --------------------------------------------------------------------------------------------------------------
# module wrapper for accelerate / DDP / FSDP
# --------------------------------------------------------------------------------------------------------------


class CausalLMWithLogps(nn.Module):
    """``forward(input_ids, attention_mask, labels, position_ids=None)`` -> dict of :class:`TokenLogps` tensors.

    Give *this* module to ``accelerator.prepare`` so DDP/FSDP see one normal forward call that runs the decoder
    and the chunked LM head. Rebuild the dataclass with ``TokenLogps.from_dict(out, seq_len=input_ids.shape[1])``.
    """

    def __init__(self, model: nn.Module, *, chunk_size: int = 1024, temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.temperature = temperature
        unwrap_causal_lm(model)  # fail early on unsupported wrappers

    @property
    def config(self):
        return unwrap_causal_lm(self.model).config

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        out = sequence_logps(
            self.model,
            input_ids,
            attention_mask,
            labels,
            position_ids=position_ids,
            chunk_size=self.chunk_size,
            temperature=self.temperature,
        )
        return out.to_dict()
