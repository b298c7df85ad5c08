"""Memory-lean per-sequence log-probabilities of label tokens.

Every training algorithm needs, for each sequence of a batch, the sum of ``log p(label_t | tokens_<t)``
over its label positions (``labels != -100``). The naive way, ``model(...).logits.float().log_softmax(-1)``,
materialises ``[batch, seq, vocab]`` logits in fp32 (several copies, once more for backward). With a 49k-150k
vocabulary that dominates peak memory.

:func:`sequence_logps` instead runs only the decoder, gathers the hidden states of the positions that predict a
label, and applies the LM head to at most ``chunk_size`` of them at a time: fp32 log-softmax per chunk, keep only
the label token's log-prob. A plain linear head takes :mod:`alignctl.models.head_logps`, whose hand-written
backward recomputes one chunk's logits at a time and turns them into the gradient in place. Any other head
(LoRA on the head, soft-capped or scaled logits, WPO's extra term) runs each chunk's head + log-softmax + gather
under ``torch.utils.checkpoint``, so backward also re-computes one chunk at a time instead of keeping all of them.

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
from alignctl.models.head_logps import fused_head_applies, head_label_logps, upcast as _upcast
from alignctl.models.varlen import varlen_kwargs

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
    log_sum_sq: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None

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
        for name in ("log_sum_sq", "aux_loss"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
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
            log_sum_sq=d.get("log_sum_sq"),
            aux_loss=d.get("aux_loss"),
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
    with_log_sum_sq: bool = False,
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
    if with_log_sum_sq:  # WPO's alignment term log sum_v p(v)^2, detached
        return logps, vocab_mean, torch.logsumexp(2 * all_logps.detach(), -1)
    if not with_entropy:
        return logps, vocab_mean
    detached = all_logps.detach()
    return logps, vocab_mean, -(detached.exp() * detached).sum(-1)


def _generic_head_logps(h_sel, targets, head, post, temperature, chunk_size, log_sum_sq):
    """Any head (LoRA, soft-capped, scaled): autograd through each chunk, recomputed in backward under
    ``torch.utils.checkpoint``. Returns (label log-probs, detached vocab means, WPO terms per chunk)."""
    use_ckpt = torch.is_grad_enabled()
    logps_chunks, mean_chunks, sq_chunks = [], [], []
    for start in range(0, h_sel.shape[0], chunk_size):
        h = h_sel[start : start + chunk_size]
        t = targets[start : start + chunk_size]
        if use_ckpt:
            res = checkpoint(_chunk_logps, h, t, head, post, temperature, False, log_sum_sq, use_reentrant=False)
        else:
            res = _chunk_logps(h, t, head, post, temperature, False, log_sum_sq)
        logps_chunks.append(res[0])
        mean_chunks.append(res[1])
        if log_sum_sq:
            sq_chunks.append(res[2])
    token_logps = torch.cat(logps_chunks) if len(logps_chunks) > 1 else logps_chunks[0]
    vocab_mean = (torch.cat(mean_chunks) if len(mean_chunks) > 1 else mean_chunks[0]).detach()
    return token_logps, vocab_mean, sq_chunks


def sequence_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    cu_seq_lens: torch.Tensor | None = None,
    log_sum_sq: bool = False,
    router_aux: bool = False,
) -> TokenLogps:
    """Per-sequence label log-probs without materialising ``[batch, seq, vocab]`` logits.

    ``model`` is a transformers causal LM or a peft ``PeftModel`` around one. ``labels`` is aligned with
    ``input_ids`` (-100 = ignore). For packed rows pass ``attention_mask=None`` and ``position_ids`` restarting at 0
    for each example: transformers then builds a block-diagonal causal mask.

    Padding-free batches (:mod:`alignctl.models.varlen`): one row ``[1, N]`` of ``S`` sequences end to end,
    ``position_ids`` restarting at each, and ``cu_seq_lens`` ``[S + 1]`` their boundaries. The result then has one
    entry per *sequence* (``[S]``), and its per-token positions are positions within each sequence, exactly as the
    padded layout of the same sequences would give.

    ``log_sum_sq``: also return, per sequence, the detached sum over label tokens of ``log sum_v p(v)^2`` (WPO).
    ``router_aux``: also return a mixture-of-experts model's load-balancing loss (``aux_loss``, 0-dim).
    """
    _check_inputs(input_ids, attention_mask, labels, position_ids, temperature)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if cu_seq_lens is not None:
        _check_padding_free(input_ids, attention_mask, position_ids, cu_seq_lens)
    causal_lm = unwrap_causal_lm(model)
    decoder, head = _decoder_and_head(causal_lm)
    post = _logits_postprocess(causal_lm)

    out = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        **varlen_kwargs(cu_seq_lens),
        **({"output_router_logits": True} if router_aux else {}),
    )
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # [B, T, H]
    B, T = input_ids.shape

    labels = _effective_labels(labels, position_ids)
    shifted = labels[:, 1:]  # label at t+1 is predicted from hidden at t
    mask = shifted != IGNORE_INDEX  # [B, T-1]
    row_idx, pos_idx = mask.nonzero(as_tuple=True)  # row-major order
    n = row_idx.numel()

    if cu_seq_lens is None:  # one result per row
        batch_idx, out_pos, seq_len = row_idx, pos_idx + 1, T
        num_tokens = mask.sum(-1)
    else:  # one result per sequence of the padding-free row
        batch_idx, out_pos, B, seq_len = _sequence_layout(position_ids, cu_seq_lens, pos_idx + 1)
        num_tokens = torch.bincount(batch_idx, minlength=B)
    if n == 0:
        # Keep the graph connected to every parameter (DDP, loss.backward()) with an exact zero.
        row_idx = batch_idx = pos_idx = torch.zeros(1, dtype=torch.long, device=input_ids.device)
        targets = torch.zeros(1, dtype=torch.long, device=input_ids.device)
        weight = 0.0
    else:
        targets = shifted[row_idx, pos_idx]
        weight = None
    if targets.numel() and (targets.min() < 0):
        raise ValueError("labels must be token ids >= 0 or -100")
    h_sel = hidden[row_idx, pos_idx]  # [N, H]

    if post is None and not log_sum_sq and fused_head_applies(head):
        token_logps, vocab_mean = head_label_logps(h_sel, head, targets, temperature, chunk_size)
        sq_chunks = []
    else:
        token_logps, vocab_mean, sq_chunks = _generic_head_logps(h_sel, targets, head, post, temperature, chunk_size, log_sum_sq)

    if weight is not None:
        token_logps = token_logps * weight
        vocab_mean = vocab_mean * weight
    sum_logps = token_logps.new_zeros(B).index_add(0, batch_idx, token_logps)
    logits_sum = vocab_mean.new_zeros(B).index_add(0, batch_idx, vocab_mean)
    sum_sq = None
    if log_sum_sq:
        sq = torch.cat(sq_chunks) * (0.0 if n == 0 else 1.0)
        sum_sq = sq.new_zeros(B).index_add(0, batch_idx, sq)
    aux = _router_aux_loss(causal_lm, out, attention_mask) if router_aux else None
    if n == 0:
        token_logps = token_logps[:0]
        batch_idx = out_pos = batch_idx[:0]
    return TokenLogps(
        sum_logps=sum_logps,
        num_tokens=num_tokens,
        logits_sum=logits_sum,
        token_logps=token_logps,
        token_batch_idx=batch_idx,
        token_pos_idx=out_pos,
        seq_len=seq_len,
        log_sum_sq=sum_sq,
        aux_loss=aux,
    )


def _router_aux_loss(causal_lm: nn.Module, decoder_out, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The load-balancing loss a mixture-of-experts causal LM's own forward computes from its router logits
    (the ``load_balancing_loss_func`` of its transformers module, with its expert count and top-k)."""
    import sys

    module = sys.modules.get(type(causal_lm).__module__)
    loss_fn = getattr(module, "load_balancing_loss_func", None)
    router_logits = getattr(decoder_out, "router_logits", None)
    num_experts = getattr(causal_lm, "num_experts", None)
    top_k = getattr(causal_lm, "num_experts_per_tok", None)
    if loss_fn is None or router_logits is None or num_experts is None or top_k is None:
        raise ModelLoadError(
            f"{type(causal_lm).__name__} returns no router logits / load-balancing loss; "
            "the router auxiliary loss needs a mixture-of-experts model (e.g. Mixtral, Qwen2-MoE)"
        )
    return loss_fn(router_logits, num_experts, top_k, attention_mask)


def _check_padding_free(input_ids, attention_mask, position_ids, cu_seq_lens) -> None:
    if input_ids.shape[0] != 1 or attention_mask is not None or position_ids is None:
        raise ValueError("a padding-free batch is one row [1, N] with position_ids and no attention_mask")
    if cu_seq_lens.dim() != 1 or cu_seq_lens.numel() < 2 or int(cu_seq_lens[-1]) != input_ids.shape[1]:
        raise ValueError(
            f"cu_seq_lens {cu_seq_lens.tolist()} must be the cumulative sequence boundaries of the row "
            f"(0, ..., {input_ids.shape[1]})"
        )


def _sequence_layout(position_ids: torch.Tensor, cu_seq_lens: torch.Tensor, label_pos: torch.Tensor):
    """For label positions of a padding-free row: (sequence index, position within the sequence),
    the number of sequences and the longest sequence."""
    cu = cu_seq_lens.to(device=label_pos.device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    sequence_of = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)  # [N]
    return sequence_of[label_pos], position_ids.reshape(-1)[label_pos], lengths.numel(), int(lengths.max())


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
    """``forward(input_ids, attention_mask, labels, position_ids=None, cu_seq_lens=None)`` -> dict of
    :class:`TokenLogps` tensors (one entry per sequence for a padding-free row).

    Give *this* module to ``accelerator.prepare`` so DDP/FSDP see one normal forward call that runs the decoder
    and the chunked LM head. Rebuild the dataclass with ``TokenLogps.from_dict(out, seq_len=input_ids.shape[1])``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        chunk_size: int = 1024,
        temperature: float = 1.0,
        log_sum_sq: bool = False,
        router_aux: bool = False,
    ):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.temperature = temperature
        self.log_sum_sq = log_sum_sq  # WPO weights
        self.router_aux = router_aux  # mixture-of-experts load-balancing loss
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
        cu_seq_lens: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        out = sequence_logps(
            self.model,
            input_ids,
            attention_mask,
            labels,
            position_ids=position_ids,
            chunk_size=self.chunk_size,
            temperature=self.temperature,
            cu_seq_lens=cu_seq_lens,
            log_sum_sq=self.log_sum_sq,
            router_aux=self.router_aux,
        )
        return out.to_dict()
