"""One scalar reward per sequence, from padded rows or from a padding-free row.

A sequence classifier's own forward pools one score per padded row. For a padding-free row
(``[1, N]``, several sequences end to end, see :mod:`alignctl.models.varlen`) alignctl runs the
classifier's backbone on the row and pools each sequence itself, the way the classifier's forward
would have pooled its padded row:

- transformers' generic decoder classifiers (Llama, Qwen2/3, Mistral, Gemma, ...): ``score`` at the
  rightmost token of the sequence that is not the pad token (the padded forward's rule, which also
  skips a final EOS when EOS is the pad token);
- BERT: the pooler on the sequence's first token, then ``classifier``.

Other classifiers keep padded batches (the summary says why).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from alignctl.models.logps import unwrap_causal_lm
from alignctl.models.varlen import SUPPORTED, VARLEN_SDPA, attn_implementation, route_sdpa_per_sequence, varlen_kwargs

# Encoders attend both ways: alignctl's per-sequence kernel keeps the sequences apart, while
# transformers' eager bidirectional mask ignores restarting position ids (and the flash kernels'
# encoder path is not checked here).
ENCODER_KERNELS = ("sdpa", VARLEN_SDPA)


class RewardScorer(nn.Module):
    """``forward(input_ids, attention_mask=None, position_ids=None, cu_seq_lens=None)`` -> rewards
    ``[rows]`` or ``[sequences]`` (float32). Give *this* module to ``accelerator.prepare`` so DDP sees
    one forward call on either path."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model  # the classifier, maybe under peft

    @property
    def config(self):
        return classifier_of(self.model).config

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        cu_seq_lens: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if cu_seq_lens is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float()
        if attention_mask is not None or position_ids is None or input_ids.shape[0] != 1:
            raise ValueError("a padding-free row is [1, N] with position_ids and cu_seq_lens and no attention_mask")
        return padding_free_rewards(classifier_of(self.model), input_ids, position_ids, cu_seq_lens)


def classifier_of(model: nn.Module) -> nn.Module:
    """The transformers classifier inside ``model`` (a RewardScorer, a peft model or the classifier).

    LoRA layers and peft's trainable copy of the head sit inside the classifier's modules, so calling
    them runs the adapter (the same unwrapping as the log-prob path's)."""
    if isinstance(model, RewardScorer):
        model = model.model
    return unwrap_causal_lm(model)


def _pooling(classifier: nn.Module) -> Optional[str]:
    """``last`` (decoder classifiers), ``first`` (BERT), or None for a classifier alignctl cannot pool."""
    from transformers import BertForSequenceClassification
    from transformers.modeling_layers import GenericForSequenceClassification

    if isinstance(classifier, GenericForSequenceClassification):
        return "last"
    if isinstance(classifier, BertForSequenceClassification) and classifier.bert.pooler is not None:
        return "first"
    return None


def scorer_padding_free_support(model: nn.Module) -> Tuple[bool, str]:
    """(whether the reward model can take padding-free rows, the kernel that would run them or why not)."""
    classifier = classifier_of(model)
    pooling = _pooling(classifier)
    if pooling is None:
        return False, f"{type(classifier).__name__} pools its rows in a way alignctl does not reproduce per sequence"
    impl = attn_implementation(classifier)
    kernels = ENCODER_KERNELS if pooling == "first" else SUPPORTED
    if impl not in kernels:
        return False, f"attention implementation {impl!r} does not run this model padding-free (use sdpa)"
    if impl in ("sdpa", VARLEN_SDPA):
        return True, "sdpa, one kernel per sequence"
    return True, "eager, block-diagonal mask" if impl == "eager" else f"{impl} varlen"


def enable_scorer_padding_free(model: nn.Module) -> str:
    """Route the classifier's sdpa attention through the per-sequence kernel (padded calls unchanged)."""
    ok, how = scorer_padding_free_support(model)
    if not ok:
        raise ValueError(how)
    route_sdpa_per_sequence(classifier_of(model))
    return how


def padding_free_rewards(
    classifier: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seq_lens: torch.Tensor
) -> torch.Tensor:
    """Rewards ``[S]`` (float32) of the ``S`` sequences of one padding-free row."""
    pooling = _pooling(classifier)
    if pooling is None:
        raise ValueError(f"{type(classifier).__name__}: no padding-free pooling (use padded batches)")
    backbone = getattr(classifier, classifier.base_model_prefix)
    kwargs: Dict[str, object] = dict(input_ids=input_ids, position_ids=position_ids, **varlen_kwargs(cu_seq_lens))
    if pooling == "last":
        kwargs["use_cache"] = False
    hidden = backbone(**kwargs).last_hidden_state[0]  # [N, H]
    cu = cu_seq_lens.to(device=hidden.device, dtype=torch.long)
    if pooling == "first":
        pooled = backbone.pooler(hidden[cu[:-1]].unsqueeze(1))  # the pooler reads position 0 of each row
        return classifier.classifier(classifier.dropout(pooled)).squeeze(-1).float()
    return classifier.score(hidden[_last_scored_positions(classifier, input_ids[0], cu)]).squeeze(-1).float()


def _last_scored_positions(classifier: nn.Module, ids: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """Index in the row of each sequence's rightmost token that is not the pad token (its first
    token when all are pad; its last when the model has no pad token), as the padded forward picks."""
    starts, ends = cu[:-1], cu[1:]
    pad_id = classifier.config.get_text_config().pad_token_id
    if pad_id is None:
        return ends - 1
    lengths = ends - starts
    sequence = torch.repeat_interleave(torch.arange(lengths.numel(), device=ids.device), lengths)
    offset = torch.arange(ids.numel(), device=ids.device) - starts[sequence]
    scored = torch.where(ids != pad_id, offset, torch.zeros_like(offset))
    last = torch.zeros(lengths.numel(), dtype=offset.dtype, device=ids.device).scatter_reduce(
        0, sequence, scored, reduce="amax", include_self=True
    )
    return starts + last
