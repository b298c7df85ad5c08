"""The PPO policy: a causal LM with a value head, and the lean per-response-token forward.

Two value estimators (``algo.value_model``):

- ``null`` (default): a scalar linear head on the policy's last hidden state, sharing the whole
  trunk with the policy (one forward gives log-probs and values; extra memory: hidden_size + 1
  parameters), as the reference library's ``AutoModelForCausalLMWithValueHead``;
- a path (usually the reward model's run directory or folder): a separate sequence-classification
  model whose score head is applied at every position, initialised from that model (extra memory:
  a second model with its gradients and optimizer state; its own forward per mini-batch).

Log-probs are taken as in ``models/logps``: the LM head runs only on response positions, in chunks,
in fp32, at the sampling temperature, so no ``[batch, seq, vocab]`` logits tensor exists.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from alignctl.models.logps import _chunk_logps, _decoder_and_head, _logits_postprocess, _upcast, unwrap_causal_lm
from alignctl.rollout.batch import Rollout

VALUE_HEAD_FILE = "value_head.safetensors"


def response_hidden(decoder: nn.Module, rollout: Rollout) -> torch.Tensor:
    """``[B, R, H]`` hidden states of the positions that predict each response token."""
    out = decoder(
        input_ids=rollout.input_ids,
        attention_mask=rollout.attention_mask,
        position_ids=rollout.position_ids,
        use_cache=False,
    )
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    prompt_width, response_width = rollout.prompt_ids.shape[1], rollout.response_ids.shape[1]
    return hidden[:, prompt_width - 1 : prompt_width + response_width - 1]


def token_logps(
    causal_lm: nn.Module,
    hidden: torch.Tensor,
    rollout: Rollout,
    *,
    temperature: float,
    chunk_size: int,
    with_entropy: bool = False,
):
    """``[B, R]`` log-probs of the response tokens (0 on padding) and, if asked, ``[B, R]`` entropies."""
    from torch.utils.checkpoint import checkpoint

    _, head = _decoder_and_head(causal_lm)
    post = _logits_postprocess(causal_lm)
    mask = rollout.response_mask.bool()
    rows, cols = mask.nonzero(as_tuple=True)
    selected, targets = hidden[rows, cols], rollout.response_ids[rows, cols]
    logps_parts, entropy_parts = [], []
    for start in range(0, max(selected.shape[0], 1), chunk_size):
        args = (selected[start : start + chunk_size], targets[start : start + chunk_size], head, post, temperature, with_entropy)
        if torch.is_grad_enabled():  # backward recomputes one chunk's logits at a time
            out = checkpoint(_chunk_logps, *args, use_reentrant=False)
        else:
            out = _chunk_logps(*args)
        logps_parts.append(out[0])
        if with_entropy:
            entropy_parts.append(out[2])
    logps = hidden.new_zeros(mask.shape, dtype=torch.float32).index_put((rows, cols), torch.cat(logps_parts))
    entropy = None
    if with_entropy:
        entropy = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device).index_put(
            (rows, cols), torch.cat(entropy_parts)
        )
    return logps, entropy


class PolicyWithValue(nn.Module):
    """``forward(rollout)`` -> ``{"logprobs", "values"?, "entropy"?}``, each ``[B, R]``.

    ``with_value=False`` (GRPO, RLOO, iterative SFT): the policy alone, no value estimate.

    The module handed to ``accelerator.prepare``: DDP sees one forward that runs the policy (and
    the value model) and both heads.
    """

    def __init__(
        self,
        policy: nn.Module,
        *,
        value_model: Optional[nn.Module] = None,
        with_value: bool = True,
        temperature: float = 1.0,
        chunk_size: int = 1024,
        init_seed: int = 0,
    ) -> None:
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        self.temperature = temperature
        self.chunk_size = chunk_size
        if value_model is None and with_value:
            hidden_size = unwrap_causal_lm(policy).config.hidden_size
            generator = torch.Generator().manual_seed(init_seed)
            self.value_head = nn.Linear(hidden_size, 1)
            with torch.no_grad():  # small random init, seeded: the same run starts from the same head
                self.value_head.weight.normal_(0.0, 1.0 / (hidden_size + 1), generator=generator)
                self.value_head.bias.zero_()
        else:
            self.value_head = None

    @property
    def causal_lm(self) -> nn.Module:
        return unwrap_causal_lm(self.policy)

    def forward(self, rollout: Rollout, with_entropy: bool = False, temperature: Optional[float] = None) -> Dict[str, torch.Tensor]:
        """``temperature`` overrides the sampling temperature (iterative SFT trains at 1)."""
        causal_lm = self.causal_lm
        decoder, _ = _decoder_and_head(causal_lm)
        hidden = response_hidden(decoder, rollout)
        logprobs, entropy = token_logps(
            causal_lm, hidden, rollout, temperature=temperature or self.temperature, chunk_size=self.chunk_size,
            with_entropy=with_entropy,
        )
        out = {"logprobs": logprobs}
        if self.value_head is not None:
            out["values"] = self.value_head(hidden).squeeze(-1).float() * rollout.response_mask
        elif self.value_model is not None:
            out["values"] = value_model_values(self.value_model, rollout) * rollout.response_mask
        if entropy is not None:
            out["entropy"] = entropy
        return out


def value_model_values(value_model: nn.Module, rollout: Rollout) -> torch.Tensor:
    """Per-position values from a sequence-classification model: its score head at every position."""
    backbone = getattr(value_model, value_model.base_model_prefix)
    hidden = response_hidden(backbone, rollout)
    return value_model.score(hidden).squeeze(-1).float()


def load_value_model(path: str, trust_remote_code: bool = False) -> nn.Module:
    """A separate value model initialised from a one-output sequence classifier (a reward model)."""
    from alignctl.errors import ConfigError
    from alignctl.rl.rewards import _model_folder

    try:
        folder = _model_folder(path)
    except ConfigError as exc:  # same rules as reward.model; name the field the user set
        raise ConfigError(str(exc).replace("reward.model=", "algo.value_model=")) from None
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype="float32", trust_remote_code=trust_remote_code)
    if model.config.num_labels != 1 or not hasattr(model, "score"):
        raise ConfigError(
            f"algo.value_model={path}: expected a one-output sequence classifier with a 'score' head "
            "(a model trained with algo=reward)"
        )
    model.config.use_cache = False
    return model


@torch.no_grad()
def reference_logps(reference, rollout: Rollout, *, temperature: float, chunk_size: int) -> torch.Tensor:
    """``[B, R]`` reference log-probs: a frozen copy, or the policy with its LoRA adapter switched off."""
    model = reference.model
    adapter_off = model.disable_adapter() if reference.mode == "adapter" else nullcontext()
    was_training = model.training
    model.eval()
    try:
        with adapter_off:
            causal_lm = unwrap_causal_lm(model)
            decoder, _ = _decoder_and_head(causal_lm)
            hidden = response_hidden(decoder, rollout)
            logps, _ = token_logps(causal_lm, hidden, rollout, temperature=temperature, chunk_size=chunk_size)
    finally:
        model.train(was_training)
    return logps


@torch.no_grad()
def full_kl_per_token(policy_lm: nn.Module, reference, rollout: Rollout, *, temperature: float, chunk_size: int) -> torch.Tensor:
    """``[B, R]`` KL(policy || reference) over the whole vocabulary at each response token
    (``kl_penalty=full``), computed chunk by chunk from both models' hidden states."""
    from alignctl.rl.kl import full_kl

    ref_model = reference.model

    def adapter_off():
        return ref_model.disable_adapter() if reference.mode == "adapter" else nullcontext()

    def hidden_of(model):
        causal_lm = unwrap_causal_lm(model)
        return causal_lm, response_hidden(_decoder_and_head(causal_lm)[0], rollout)

    def logits_of(causal_lm, hidden):
        post = _logits_postprocess(causal_lm)
        logits = _decoder_and_head(causal_lm)[1](hidden)
        return _upcast(post(logits) if post is not None else logits)

    policy_causal_lm, policy_hidden = hidden_of(policy_lm)
    with adapter_off():
        ref_causal_lm, ref_hidden = hidden_of(ref_model)
    rows, cols = rollout.response_mask.bool().nonzero(as_tuple=True)
    out = torch.zeros(rollout.response_mask.shape, dtype=torch.float32, device=policy_hidden.device)
    parts = []
    for start in range(0, rows.numel(), chunk_size):
        r, c = rows[start : start + chunk_size], cols[start : start + chunk_size]
        logits = logits_of(policy_causal_lm, policy_hidden[r, c])
        with adapter_off():  # the head too runs as the reference (an adapter may sit on it)
            ref_logits = logits_of(ref_causal_lm, ref_hidden[r, c])
        parts.append(full_kl(logits, ref_logits, temperature=temperature))
    if parts:
        out = out.index_put((rows, cols), torch.cat(parts))
    return out


def save_value_head(model: PolicyWithValue, folder: Path) -> None:
    """The value head (or the separate value model) beside the saved policy."""
    if model.value_head is None and model.value_model is None:
        return
    if model.value_head is not None:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in model.value_head.state_dict().items()}
        save_file(state, str(folder / VALUE_HEAD_FILE))
    else:
        model.value_model.save_pretrained(folder / "value_model", safe_serialization=True)
