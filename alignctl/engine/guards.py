"""Stopping cleanly: SIGINT/SIGTERM finish the current step and checkpoint; non-finite losses are
caught before they reach the weights."""

from __future__ import annotations

import signal
import threading
from typing import List

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
