"""What leaves a run while it trains: the rich progress bar, metrics.jsonl, TensorBoard, the summary.

Only the main process tracks; the others get a tracker whose methods do nothing.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)


class RunTracker:
    def __init__(
        self, run_dir: Path, total_steps: int, *, enabled: bool, progress: bool, tensorboard: bool, unit: str = "tokens"
    ):
        self.enabled = enabled
        self.unit_short = {"tokens": "tok"}.get(unit, unit)
        self.total_steps = total_steps
        self.metrics_path = run_dir / "metrics.jsonl"
        self._progress: Optional[Progress] = None
        self._task = None
        self._writer = None
        self._start = time.perf_counter()
        if not enabled:
            return
        if progress:
            self._progress = Progress(
                TextColumn("[bold]step"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def __enter__(self) -> "RunTracker":
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task("train", total=self.total_steps, stats="")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def advance(self, step: int, loss: float, lr: float, units_per_s: float) -> None:
        """Move the bar to ``step`` and show the latest loss, lr and throughput."""
        if self._progress is not None and self._task is not None:
            stats = f"loss {loss:.4f}  lr {lr:.2e}  {units_per_s:,.1f} {self.unit_short}/s"
            self._progress.update(self._task, completed=step, stats=stats)

    def log(self, step: int, metrics: Dict[str, float], split: str = "train") -> None:
        """One JSON object per call in metrics.jsonl (and TensorBoard scalars when enabled)."""
        if not self.enabled:
            return
        record = {"step": step, "split": split, **{k: _plain(v) for k, v in metrics.items()}}
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(f"{split}/{key}", value, step)
        if split != "train" and self._progress is not None:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            self._progress.console.print(f"[cyan]{split} @ step {step}[/]  {shown}")

    def log_image(self, tag: str, image: Any, step: int) -> None:
        """An image (uint8 numpy array, height x width x channels) to TensorBoard; nothing when
        TensorBoard is off or on a process other than the main one."""
        if self._writer is not None:
            self._writer.add_image(tag, image, step, dataformats="HWC")

    def print(self, message: str) -> None:
        if self.enabled:
            (self._progress.console if self._progress else console).print(message)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def print_summary(title: str, rows: List[Tuple[str, str]]) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def read_metrics(run_dir: Path) -> List[Dict[str, Any]]:
    return [record for _, record in _read_jsonl(Path(run_dir) / "metrics.jsonl")]


def _read_jsonl(path: Path) -> List[Tuple[str, Dict[str, Any]]]:
    """(line, record) pairs of a JSON-lines file; a line that does not parse (the partial last
    line of a process killed mid-write) is left out."""
    pairs = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            pairs.append((line, record))
    return pairs


def truncate_metrics(run_dir: Path, after_step: int) -> None:
    """Drop records logged after ``after_step`` (a resumed run logs those steps again), and any
    partial line."""
    for name in ("metrics.jsonl", SAMPLES_FILE):
        _truncate_jsonl(Path(run_dir) / name, after_step)


def _truncate_jsonl(path: Path, after_step: int) -> None:
    if not path.exists():
        return
    kept = [line for line, r in _read_jsonl(path) if isinstance(r.get("step"), int) and r["step"] <= after_step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


SAMPLES_FILE = "samples.jsonl"


def log_samples(run_dir: Path, step: int, samples: List[Tuple[str, str, float]], tracker: Optional[RunTracker] = None) -> None:
    """A few (prompt, completion, score) triples: a table on the console and lines in samples.jsonl."""
    with (Path(run_dir) / SAMPLES_FILE).open("a", encoding="utf-8") as handle:
        for prompt, completion, score in samples:
            handle.write(json.dumps({"step": step, "prompt": prompt, "completion": completion, "score": score}) + "\n")
    if tracker is None or not tracker.enabled:
        return
    table = Table(title=f"samples @ step {step}", title_justify="left", show_lines=True)
    table.add_column("prompt", overflow="fold", max_width=40)
    table.add_column("completion", overflow="fold", max_width=60)
    table.add_column("score", justify="right")
    for prompt, completion, score in samples:
        table.add_row(prompt[-200:], completion[:400], f"{score:.3f}")
    (tracker._progress.console if tracker._progress else console).print(table)
