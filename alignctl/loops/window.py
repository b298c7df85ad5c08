"""Metric aggregation between log lines: sums of tensors, reduced across processes on flush."""

from __future__ import annotations

import time
from typing import Any, Dict, Tuple

import torch

Metrics = Dict[str, torch.Tensor]


class MetricWindow:
    """Sums of metrics over the micro-batches since the last flush (tensors: no sync per step)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: Metrics = {}
        self.count = 0
        self.tokens = torch.zeros((), dtype=torch.long)
        self.grad_norm = None
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, metrics: Metrics, tokens: torch.Tensor) -> None:
        for key, value in {"loss": loss, **metrics}.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.count += 1
        self.tokens = self.tokens + tokens.cpu()

    def state_dict(self) -> Dict[str, Any]:
        """What a checkpoint keeps so a resumed run logs the same averages."""
        return {"sums": {k: v.cpu() for k, v in self.sums.items()}, "count": self.count, "tokens": self.tokens}

    def load_state_dict(self, state: Dict[str, Any], device) -> None:
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}
        self.count = int(state["count"])
        self.tokens = state["tokens"]

    def flush(self, accelerator) -> Tuple[Dict[str, float], int]:
        keys = sorted(self.sums)
        stacked = torch.stack([self.sums[k] for k in keys]) / max(self.count, 1)
        stacked = accelerator.reduce(stacked.to(accelerator.device), reduction="mean")
        tokens = int(accelerator.reduce(self.tokens.to(accelerator.device), reduction="sum"))
        elapsed = time.perf_counter() - self.started
        record = {k: float(v) for k, v in zip(keys, stacked.tolist())}
        record["tokens_per_s"] = tokens / max(elapsed, 1e-9)
        if self.grad_norm is not None:
            record["grad_norm"] = float(self.grad_norm)
        self.reset()
        return record, tokens
