"""Metric aggregation between log lines: sums of tensors, reduced across processes on flush.

A metric is either a tensor (a per-micro-batch value, averaged with equal weight over the
micro-batches of the window and the processes) or a ``Weighted(total, weight)`` pair, whose
window value is sum(total) / sum(weight) over micro-batches and processes: the exact mean of
something that only some examples of a batch have (KTO's desirable or undesirable rewards).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, NamedTuple, Tuple, Union

import torch


class Weighted(NamedTuple):
    total: torch.Tensor  # sum of the values in this micro-batch
    weight: torch.Tensor  # how many values (0 when there were none)


Metrics = Dict[str, Union[torch.Tensor, Weighted]]


class MetricWindow:
    """Sums of metrics over the micro-batches since the last flush (tensors: no sync per step).

    ``unit`` names what the throughput counts (tokens, samples, images): the record gets
    ``<unit>_per_s``, the window's units over the seconds ``timer`` advanced during the window (the
    run shell passes its clock's training seconds, so evaluation and checkpoint time are left out).
    """

    def __init__(self, unit: str = "tokens", timer: Callable[[], float] = time.perf_counter) -> None:
        self.unit = unit
        self.timer = timer
        self.reset()

    def reset(self) -> None:
        self.totals: Dict[str, torch.Tensor] = {}
        self.weights: Dict[str, torch.Tensor] = {}
        self.units = torch.zeros((), dtype=torch.long)
        self.grad_norm = None
        self.started = self.timer()

    def add(self, loss: torch.Tensor, metrics: Metrics, units: torch.Tensor) -> None:
        for key, value in {"loss": loss, **metrics}.items():
            if isinstance(value, Weighted):
                total, weight = value.total.detach().float(), value.weight.detach().float()
            else:
                total = value.detach().float()
                weight = torch.ones((), device=total.device)
            if key in self.totals:
                self.totals[key] = self.totals[key] + total
                self.weights[key] = self.weights[key] + weight
            else:
                self.totals[key], self.weights[key] = total, weight
        self.units = self.units + torch.as_tensor(units).cpu()

    def running_mean(self, key: str = "loss") -> float:
        """This process's mean of ``key`` since the last flush (a sync: call it rarely); nan when empty."""
        if key not in self.totals:
            return float("nan")
        return float(self.totals[key] / self.weights[key].clamp(min=1e-12))

    def state_dict(self) -> Dict[str, Any]:
        """What a checkpoint keeps so a resumed run logs the same averages."""
        return {
            "totals": {k: v.cpu() for k, v in self.totals.items()},
            "weights": {k: v.cpu() for k, v in self.weights.items()},
            "units": self.units,
        }

    def load_state_dict(self, state: Dict[str, Any], device) -> None:
        self.totals = {k: v.to(device) for k, v in state["totals"].items()}
        self.weights = {k: v.to(device) for k, v in state["weights"].items()}
        self.units = state["units"]

    def flush(self, accelerator) -> Tuple[Dict[str, float], int]:
        keys = sorted(self.totals)
        device = accelerator.device
        totals = torch.stack([self.totals[k].to(device) for k in keys])
        weights = torch.stack([self.weights[k].to(device) for k in keys])
        both = accelerator.reduce(torch.stack([totals, weights]), reduction="sum")
        means = both[0] / both[1].clamp(min=1e-12)
        units = int(accelerator.reduce(self.units.to(device), reduction="sum"))
        elapsed = self.timer() - self.started
        record = {k: float(v) for k, v, w in zip(keys, means.tolist(), both[1].tolist()) if w > 0}
        record[f"{self.unit}_per_s"] = units / max(elapsed, 1e-9)
        if self.grad_norm is not None:
            record["grad_norm"] = float(self.grad_norm)
        self.reset()
        return record, units
