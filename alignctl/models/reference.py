"""The reference model of preference algorithms, held in the cheapest way the run allows.

- ``adapter``: the policy is a LoRA model; its adapter is switched off for reference log-probs,
  so no second model is held.
- ``copy``: a frozen copy of the starting policy (or of ``model.ref_name_or_path``).
- ``initial``: the policy itself before its first step, used once to precompute reference
  log-probs (``algo.precompute_ref_logps`` with no other reference model), so no copy is built;
- ``precomputed``: reference log-probs were computed once over the data set before training and
  travel in the batch (``ref_logps`` column); no model is held while training.
- ``none``: reference-free; callers pass zeros.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Callable, Dict, Optional

import torch

from alignctl.models.logps import TokenLogps, sequence_logps


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 (policy and reference then agree at step 0)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def is_peft_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def reference_dtype(precision: str) -> Optional[torch.dtype]:
    """The dtype a frozen reference copy is held in under ``precision`` (None: as loaded, fp32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def frozen_copy(policy: torch.nn.Module, dtype: Optional[torch.dtype]) -> torch.nn.Module:
    """A deep copy of ``policy`` whose floating-point parameters are created directly in ``dtype``
    (None: as they are), so no full-precision copy exists even for a moment (SmolLM2-135M under
    bf16: 269 MB allocated instead of 538 MB then cast). Tied parameters stay tied: deepcopy's memo
    maps each parameter object to its one copy."""
    if dtype is None:
        return copy.deepcopy(policy)
    memo = {}
    for param in policy.parameters():
        if id(param) not in memo and param.is_floating_point():
            memo[id(param)] = torch.nn.Parameter(param.detach().to(dtype, copy=True), requires_grad=False)
    return copy.deepcopy(policy, memo)


class ReferenceModel:
    def __init__(self, mode: str, model: Optional[torch.nn.Module] = None, chunk_size: int = 1024):
        self.mode = mode
        self.model = model
        self.chunk_size = chunk_size
        # How a sequence's token log-probs become its value (None: their sum); e.g. LD-DPO's weighting.
        self.reduce: Optional[Callable[[TokenLogps], torch.Tensor]] = None

    @classmethod
    def build(cls, job, policy: torch.nn.Module, tokenizer, *, reference_free: bool) -> "ReferenceModel":
        """Pick the mode from the job; ``policy`` is the unwrapped model before accelerate.prepare."""
        chunk = job.train.logps_chunk_size
        if reference_free:
            return cls("none", chunk_size=chunk)
        if job.model.ref_name_or_path:
            from alignctl.models.load import load_causal_lm

            ref = load_causal_lm(job.model, tokenizer, name_or_path=job.model.ref_name_or_path)
        elif is_peft_model(policy):
            return cls("adapter", policy, chunk_size=chunk)
        elif job.algo.get("precompute_ref_logps"):
            # The starting policy is the reference: its own (fp32-master) forward gives the log-probs
            # before any step, which a frozen copy would only round (and cost a second model).
            return cls("initial", policy, chunk_size=chunk)
        else:
            ref = frozen_copy(policy, reference_dtype(job.precision.name))
        ref.eval()
        ref.requires_grad_(False)
        disable_dropout(ref)
        half = reference_dtype(job.precision.name)
        if half is not None:  # frozen: no fp32 master weights needed, autocast computes in half anyway
            ref.to(half)
        return cls("copy", ref, chunk_size=chunk)

    def to(self, device: torch.device) -> "ReferenceModel":
        if self.mode == "copy" and self.model is not None:
            self.model.to(device)
        return self

    def sum_logps(self, batch: Dict[str, torch.Tensor], autocast=nullcontext) -> torch.Tensor:
        """[sequences] summed reference log-probs of the batch's label tokens (padded or padding-free)."""
        if self.mode == "none":
            return torch.zeros(batch["seq_lengths"].shape[0], device=batch["input_ids"].device)
        if self.mode == "precomputed":
            return batch["ref_logps"]
        adapter_off = self.model.disable_adapter() if self.mode == "adapter" else nullcontext()
        was_training = self.model.training
        self.model.eval()
        try:
            # inference_mode: no autograd bookkeeping at all (lighter than no_grad); the result is
            # cloned outside it so losses may use it like any tensor.
            with torch.inference_mode(), adapter_off, autocast():
                out = sequence_logps(
                    self.model,
                    batch["input_ids"],
                    batch.get("attention_mask"),
                    batch["labels"],
                    position_ids=batch.get("position_ids"),
                    chunk_size=self.chunk_size,
                    cu_seq_lens=batch.get("cu_seq_lens"),
                )
        finally:
            self.model.train(was_training)
        values = out.sum_logps if self.reduce is None else self.reduce(out)
        return values.float().clone()

    @torch.no_grad()
    def mix_in(self, policy: torch.nn.Module, alpha: float) -> None:
        """TR-DPO soft update ``ref = (1 - alpha) * ref + alpha * policy`` (alpha = 1: hard sync), parameter
        by parameter in the reference's dtype (TRL 1.16.0's ``SyncRefModelCallback``)."""
        if self.mode != "copy" or self.model is None:
            raise ValueError(f"only a held reference copy can be synced (this reference is {self.mode!r})")
        ref_params, policy_params = list(self.model.parameters()), list(policy.parameters())
        if len(ref_params) != len(policy_params):
            raise ValueError("the reference and the policy have different parameter lists")
        for ref, new in zip(ref_params, policy_params):
            ref.mul_(1.0 - alpha).add_(new.detach().to(ref.dtype), alpha=alpha)

    def release(self) -> None:
        """Drop a held copy, or the handle on the policy (after precomputing)."""
        if self.mode in ("copy", "initial"):
            self.model = None
        self.mode = "precomputed"
