"""Where a run's wall time goes: set-up, training steps, evaluation, saving.

One clock per run, always in exactly one phase. Throughput (tokens/s, samples/s, ...) is units
trained divided by the seconds spent in the ``train`` phase, so evaluation, sample generation and
checkpoint writes never dilute it; the summary shows every phase beside the total.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Dict, Iterator

PHASES = ("setup", "train", "eval", "save", "finish")  # finish: plots and summary


class RunClock:
    def __init__(self, phase: str = "setup") -> None:
        self.started = time.perf_counter()
        self.spent: Dict[str, float] = {name: 0.0 for name in PHASES}
        self.current = phase
        self._since = self.started

    def switch(self, phase: str) -> str:
        """Enter ``phase``; returns the phase that was running."""
        if phase not in self.spent:
            raise ValueError(f"unknown phase {phase!r}; phases: {', '.join(PHASES)}")
        now = time.perf_counter()
        self.spent[self.current] += now - self._since
        previous, self.current, self._since = self.current, phase, now
        return previous

    @contextmanager
    def phase(self, phase: str) -> Iterator[None]:
        """Time the block as ``phase``, then go back to the phase that was running."""
        previous = self.switch(phase)
        try:
            yield
        finally:
            self.switch(previous)

    def seconds(self, phase: str) -> float:
        """Seconds spent in ``phase`` so far (the running phase included)."""
        running = time.perf_counter() - self._since if phase == self.current else 0.0
        return self.spent[phase] + running

    def total(self) -> float:
        return time.perf_counter() - self.started

    def breakdown(self) -> Dict[str, float]:
        return {name: self.seconds(name) for name in PHASES}


def rate(units: float, seconds: float) -> float:
    """Units per second; 0 before any time has passed. The one definition of every throughput shown."""
    return units / seconds if seconds > 0 else 0.0
