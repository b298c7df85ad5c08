"""Stopping cleanly: SIGINT/SIGTERM finish the current step and checkpoint; non-finite losses are
caught before they reach the weights; a loss stuck at ln(vocab) is pointed out."""

from __future__ import annotations

import math
import signal
import threading
from typing import List, Optional

import torch

from alignctl.errors import AlignctlError


class RunInterrupted(AlignctlError):
    """Raised after the stop checkpoint is written; the CLI exits non-zero with this message."""

    exit_code = 130


class NonFiniteLoss(AlignctlError):
    pass


class StopSignals:
    """Context manager: the first SIGINT/SIGTERM sets ``requested``; a second SIGINT aborts at once."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, _frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def any_process(self, accelerator) -> bool:
        """Whether any process was asked to stop (all processes must stop at the same step)."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor(float(self.requested), device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum") > 0)


def loss_is_finite(loss: torch.Tensor, accelerator) -> bool:
    """One scalar sync per micro-batch; agreed across processes so they skip or stop together."""
    bad = (~torch.isfinite(loss.detach())).float()
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return not bool(bad > 0)


def nonfinite_message(loss: torch.Tensor, step: int, rows: List[int], last_checkpoint: str | None) -> str:
    where = f"last good checkpoint: {last_checkpoint} (continue with resume=auto)" if last_checkpoint else "no checkpoint yet"
    return (
        f"non-finite loss ({float(loss.detach())}) at step {step + 1}, batch rows {rows}; {where}. "
        "Lower train.lr, check those rows, or set train.skip_nonfinite=true to skip such batches"
    )


class UniformLossWatch:
    """A token-level loss that sits at ln(vocab) means uniform predictions: the model has collapsed
    (or never learns). ``see`` returns a one-time warning after ``patience`` logged losses in a row
    within ``tolerance`` (relative) of that value."""

    def __init__(self, uniform_loss: Optional[float], patience: int = 10, tolerance: float = 1e-3) -> None:
        self.uniform_loss, self.patience, self.tolerance = uniform_loss, patience, tolerance
        self.in_a_row, self.warned = 0, False

    def see(self, loss: float) -> Optional[str]:
        if self.uniform_loss is None or self.warned:
            return None
        near = math.isfinite(loss) and abs(loss - self.uniform_loss) <= self.tolerance * self.uniform_loss
        self.in_a_row = self.in_a_row + 1 if near else 0
        if self.in_a_row < self.patience:
            return None
        self.warned = True
        return (
            f"the training loss has stayed at {loss:.4f} = ln(vocabulary size) for {self.in_a_row} logged steps: the "
            "model predicts a uniform distribution (diverged or not learning); check train.lr and the data"
        )
