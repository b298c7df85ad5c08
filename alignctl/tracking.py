"""What leaves a run while it trains: progress display, console.log, metrics.jsonl, experiment
trackers, sample tables and the summary.

Progress has three forms: on a terminal, a rich bar that moves every optimizer step; elsewhere
(output redirected to a file, CI), one plain timestamped line per logging step; with
``run.progress=false``, nothing. ``RUN_DIR/console.log`` always gets the plain lines, the
evaluation lines, sample tables, warnings and the summary. Only the main process tracks; the
others get a tracker whose methods do nothing.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

console = Console(stderr=True)

CONSOLE_LOG = "console.log"
SUMMARY_FILE = "summary.json"
SAMPLES_FILE = "samples.jsonl"
SHORT_UNITS = {"tokens": "tok", "samples": "samples", "images": "img"}


def stamp() -> str:
    """Wall-clock time of a plain progress line."""
    return datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_text(loss: float, lr: float, units_per_s: float, unit: str, eta_s: Optional[float]) -> str:
    """The figures of a progress bar or line (the same text in both)."""
    text = f"loss {loss:.4f}  lr {lr:.2e}  {units_per_s:,.1f} {SHORT_UNITS.get(unit, unit)}/s"
    return text + (f"  eta {format_duration(eta_s)}" if eta_s is not None else "")


class RunTracker:
    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        *,
        enabled: bool,
        progress: bool,
        report_to: Sequence[str] = (),  # tracker names (trackers.requested_trackers of the run config)
        unit: str = "tokens",
        run_name: str = "",
        config: Optional[Dict[str, Any]] = None,
    ):
        self.enabled = enabled
        self.unit = unit
        self.total_steps = total_steps
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.show = progress  # False: nothing on the console while training (console.log still written)
        self.bar = progress and console.is_terminal
        self._progress: Optional[Progress] = None
        self._task = None
        self._log: Optional[Console] = None
        self._log_handle = None
        self.trackers: List[Any] = []
        if not enabled:
            return
        self._log_handle = (self.run_dir / CONSOLE_LOG).open("a", encoding="utf-8")
        self._log = Console(file=self._log_handle, width=120, force_terminal=False, no_color=True, highlight=False)
        if self.bar:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn("{task.fields[stats]}"),
                TextColumn("elapsed"),
                TimeElapsedColumn(),
                console=console,
                transient=False,
            )
        names = list(report_to)
        if names:
            from alignctl.trackers import flat_config, open_trackers

            try:
                self.trackers = open_trackers(names, self.run_dir, run_name or self.run_dir.name, flat_config(config or {}))
            except Exception:
                self.close()
                raise

    def __enter__(self) -> "RunTracker":
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task("step", total=self.total_steps, stats="")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ progress
    def advance(self, step: int, loss: Optional[float], lr: float, units_per_s: float, eta_s: Optional[float] = None,
                logged: bool = True) -> None:
        """Move the bar to ``step`` (every optimizer step; ``loss`` None: the count only, the figures
        stay); at a logging step (``logged``) also write one plain timestamped line (to the console
        when it is not a terminal, and to console.log)."""
        if not self.enabled:
            return
        if loss is None:
            if self._progress is not None and self._task is not None:
                self._progress.update(self._task, completed=step)
            return
        text = progress_text(loss, lr, units_per_s, self.unit, eta_s)
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=step, stats=text)
        if logged:
            line = f"{stamp()}  step {step}/{self.total_steps}  {text}"
            self._write_line(line, to_console=self.show and not self.bar)

    @contextmanager
    def task(self, label: str, total: int) -> Iterator["TaskProgress"]:
        """A bar of its own for a pass that is not a training step (evaluation, samples)."""
        with task_progress(label, total, enabled=self.enabled and self.show, progress=self._progress,
                           log=self._write_line if self.enabled else None) as handle:
            yield handle

    # ------------------------------------------------------------------ records
    def log(self, step: int, metrics: Dict[str, float], split: str = "train") -> None:
        """One JSON object per call in metrics.jsonl (with a wall-clock ``timestamp``, Unix seconds),
        the same values to the experiment trackers; evaluation results also as a line."""
        if not self.enabled:
            return
        record = {"step": step, "split": split, "timestamp": round(time.time(), 3),
                  **{k: _plain(v) for k, v in metrics.items()}}
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        scalars = {f"{split}/{k}": float(v) for k, v in metrics.items()
                   if isinstance(_plain(v), (int, float)) and math.isfinite(float(_plain(v)))}
        for tracker in self.trackers:
            tracker.log(scalars, step=step)
        if split != "train":
            shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            self._write_line(f"{stamp()}  {split} @ step {step}  {shown}", to_console=self.show, style="cyan")

    def log_image(self, tag: str, image: Any, step: int) -> None:
        """An image (uint8 numpy array, height x width x channels) to the trackers that take images
        (TensorBoard, wandb, ...); nothing on a process other than the main one."""
        for tracker in self.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image(tag, image, step, dataformats="HWC")
            elif hasattr(tracker, "log_images"):
                tracker.log_images({tag: [image]}, step=step)

    def print(self, message: str) -> None:
        """A message (rich markup) on the console and in console.log."""
        if not self.enabled:
            return
        self.emit(message)

    def note(self, line: str) -> None:
        """A line for console.log only (e.g. a set-up message already shown before the log existed)."""
        if self._log is not None:
            self._log.print(line, markup=False, soft_wrap=True)

    def warn(self, message: str) -> None:
        """A warning on the console and in console.log, also after the tracker was closed."""
        if not self.enabled:
            return
        from rich.markup import escape

        console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)
        if self._log is not None:
            self._log.print(f"warning: {message}", markup=False, soft_wrap=True)
        else:
            with (self.run_dir / CONSOLE_LOG).open("a", encoding="utf-8") as handle:
                handle.write(f"warning: {message}\n")

    def stop_bar(self) -> None:
        """End the live bar (before the summary, so the table is printed below it)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def emit(self, renderable: Any) -> None:
        """Any rich renderable (a table, ...) on the console and in console.log."""
        if not self.enabled:
            return
        (self._progress.console if self._progress else console).print(renderable)
        if self._log is not None:
            self._log.print(renderable)

    def _write_line(self, line: str, to_console: bool, style: str = "") -> None:
        from rich.markup import escape

        if to_console:
            shown = f"[{style}]{escape(line)}[/]" if style else escape(line)
            (self._progress.console if self._progress else console).print(shown, highlight=False, soft_wrap=True)
        if self._log is not None:
            self._log.print(line, markup=False, soft_wrap=True)

    def close(self) -> None:
        self.stop_bar()
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle, self._log = None, None


class TaskProgress:
    """Handle of a pass with its own bar: ``advance()`` after each batch."""

    def __init__(self, progress: Optional[Progress], task) -> None:
        self._progress, self._task, self.done = progress, task, 0

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._progress is not None:
            self._progress.update(self._task, advance=n)


@contextmanager
def task_progress(label: str, total: int, *, enabled: bool, progress: Optional[Progress] = None,
                  log=None) -> Iterator[TaskProgress]:
    """A transient bar for ``label`` (``total`` batches) on a terminal, added to ``progress`` when a
    bar is live (rich allows one live display); elsewhere a start and an end line with timestamps.
    ``log(line, to_console)`` also gets the lines (console.log)."""
    start = time.perf_counter()
    own = None
    if enabled and console.is_terminal and progress is None:
        own = progress = Progress(TextColumn("[bold]{task.description}"), MofNCompleteColumn(), BarColumn(),
                                  TimeElapsedColumn(), console=console, transient=True)
        own.start()
    bar = enabled and console.is_terminal and progress is not None
    task = progress.add_task(label, total=total, stats="") if bar else None
    plain = enabled and not bar

    def say(line: str) -> None:
        if log is not None:
            log(line, to_console=plain)
        elif plain:
            console.print(line, highlight=False, soft_wrap=True, markup=False)

    say(f"{stamp()}  {label}: {total} batch{'es' if total != 1 else ''}")
    handle = TaskProgress(progress if bar else None, task)
    try:
        yield handle
    finally:
        if task is not None:
            progress.remove_task(task)
        if own is not None:
            own.stop()
    say(f"{stamp()}  {label}: done in {time.perf_counter() - start:.1f} s")


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def print_summary(title: str, rows: List[Tuple[str, str]], tracker: Optional[RunTracker] = None) -> None:
    """The end-of-run table, on the console (and in console.log when a tracker is given)."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    for key, value in rows:
        table.add_row(key, value)
    if tracker is not None and tracker.enabled:
        tracker.emit(table)
    else:
        console.print(table)


def write_summary(run_dir: Path, rows: List[Tuple[str, str]], values: Dict[str, Any]) -> Path:
    """summary.json: the summary table's rows (as shown) and its figures as numbers."""
    path = Path(run_dir) / SUMMARY_FILE
    payload = {"rows": {key: value for key, value in rows}, **{k: _plain(v) for k, v in values.items()}}
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return path


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


def log_samples(run_dir: Path, step: int, samples: List[Tuple[str, str, Optional[float]]],
                tracker: Optional[RunTracker] = None, title: str = "") -> None:
    """A few (prompt, completion, score or None) triples: a table on the console and in console.log,
    and lines in samples.jsonl."""
    with (Path(run_dir) / SAMPLES_FILE).open("a", encoding="utf-8") as handle:
        for prompt, completion, score in samples:
            handle.write(json.dumps({"step": step, "prompt": prompt, "completion": completion, "score": score}) + "\n")
    if tracker is None or not tracker.enabled:
        return
    scored = any(score is not None for _, _, score in samples)
    table = Table(title=title or f"samples @ step {step}", title_justify="left", show_lines=True, min_width=min(len(title), 100))
    table.add_column("prompt", overflow="fold", max_width=40)
    table.add_column("completion", overflow="fold", max_width=60)
    if scored:
        table.add_column("score", justify="right")
    for prompt, completion, score in samples:
        cells = [Text(prompt[-200:]), Text(completion[:400])]  # Text: brackets in model output are not markup
        if scored:
            cells.append(Text("-" if score is None else f"{score:.3f}"))
        table.add_row(*cells)
    tracker.emit(table)
