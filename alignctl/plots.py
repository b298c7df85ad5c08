"""PNG plots of a run's metrics.jsonl: written into RUN_DIR/plots at the end of every run, and by
``alignctl plot RUN_DIR [RUN_DIR ...] [--out DIR]``, which overlays several runs.

One panel per quantity (loss, learning rate, and each algorithm's main metrics: reward margins and
accuracies for preference methods, KL and reward for RL, ...), train and eval series together,
against optimizer steps; a panel is drawn only when a run logged one of its metrics. Each panel is
a PNG of its own, and ``overview.png`` holds them all. matplotlib's Agg canvas is used directly (no
pyplot, no display, no global backend switch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from alignctl.errors import ConfigError


@dataclass(frozen=True)
class Panel:
    name: str  # file stem
    title: str
    keys: Tuple[str, ...]  # metrics drawn in this panel, when logged


PANELS: Tuple[Panel, ...] = (
    Panel("loss", "loss", ("loss",)),
    Panel("lr", "learning rate", ("lr",)),
    Panel("rewards_margins", "reward margin (chosen - rejected)", ("rewards/margins",)),
    Panel("accuracy", "preference accuracy", ("rewards/accuracies", "accuracy")),
    Panel("rewards", "rewards", ("rewards/chosen", "rewards/rejected")),
    Panel("logps", "sequence log-probs", ("logps/chosen", "logps/rejected")),
    Panel("kl", "KL to the reference", ("kl", "objective/kl")),
    Panel("reward", "reward", ("reward", "env/reward_mean", "reward_mean", "round/kept_score_mean")),
    Panel("entropy", "entropy", ("entropy", "objective/entropy")),
    Panel("completion_length", "completion length (tokens)", ("completions/mean_length",)),
    Panel("throughput", "throughput (per second of training)", ("tokens_per_s", "samples_per_s", "images_per_s")),
    Panel("grad_norm", "gradient norm (before clipping)", ("grad_norm",)),
)

Series = Dict[str, List[Tuple[int, float]]]  # "split metric" -> [(step, value)]


def collect(records: Sequence[dict]) -> Dict[Tuple[str, str], List[Tuple[int, float]]]:
    """(split, metric) -> [(step, value)] of the finite numeric values, in step order."""
    out: Dict[Tuple[str, str], List[Tuple[int, float]]] = {}
    for record in records:
        step, split = record.get("step"), record.get("split", "train")
        if not isinstance(step, int):
            continue
        for key, value in record.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            out.setdefault((split, key), []).append((step, float(value)))
    for points in out.values():
        points.sort()
    return out


def panel_series(runs: Dict[str, Sequence[dict]]) -> Dict[str, Dict[str, List[Tuple[int, float]]]]:
    """Panel name -> {series label -> points} for every panel some run logged. Labels name the
    split and metric ("train loss", "eval rewards/chosen"), prefixed by the run when several."""
    collected = {run: collect(records) for run, records in runs.items()}
    panels: Dict[str, Dict[str, List[Tuple[int, float]]]] = {}
    for panel in PANELS:
        series: Dict[str, List[Tuple[int, float]]] = {}
        for run, data in collected.items():
            for key in panel.keys:
                for split in ("train", "eval"):
                    points = data.get((split, key))
                    if points:
                        label = f"{split} {key}"
                        series[f"{run}: {label}" if len(runs) > 1 else label] = points
        if series:
            panels[panel.name] = series
    return panels


def write_plots(runs: Dict[str, Sequence[dict]], out_dir: Path) -> List[Path]:
    """One PNG per panel plus overview.png into ``out_dir``; returns the files written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = panel_series(runs)
    if not panels:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    titles = {p.name: p.title for p in PANELS}
    written = []
    for name, series in panels.items():
        figure = Figure(figsize=(6.4, 4.0), dpi=100)
        FigureCanvasAgg(figure)
        _draw(figure.add_subplot(1, 1, 1), titles[name], series)
        figure.subplots_adjust(left=0.13, right=0.97, top=0.92, bottom=0.12)  # fixed: tight_layout costs a draw
        path = out_dir / f"{name}.png"
        figure.savefig(path)
        written.append(path)
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(5.0 * columns, 3.4 * rows), dpi=90)
    FigureCanvasAgg(figure)
    for i, (name, series) in enumerate(panels.items()):
        _draw(figure.add_subplot(rows, columns, i + 1), titles[name], series)
    figure.subplots_adjust(left=0.06, right=0.98, top=1 - 0.3 / rows, bottom=0.35 / rows, wspace=0.25, hspace=0.45)
    overview = out_dir / "overview.png"
    figure.savefig(overview)
    return [overview] + written


def _draw(axes, title: str, series: Dict[str, List[Tuple[int, float]]]) -> None:
    for label, points in series.items():
        steps, values = zip(*points)
        evaluation = " eval " in f" {label} "  # "eval loss", "run: eval loss"
        axes.plot(steps, values, label=label, linestyle="--" if evaluation else "-",
                  marker="o" if evaluation or len(points) == 1 else None, markersize=4)
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")


def write_run_plots(run_dir: Path) -> List[Path]:
    """RUN_DIR/plots from RUN_DIR/metrics.jsonl (what a run does at its end)."""
    from alignctl.tracking import read_metrics

    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").exists():  # stopped before its first logged step
        return []
    return write_plots({run_dir.name: read_metrics(run_dir)}, run_dir / "plots")


USAGE = """usage: alignctl plot RUN_DIR [RUN_DIR ...] [--out DIR]

Draws the metrics of one or more runs (their metrics.jsonl) as PNGs: loss, learning rate and each
algorithm's main metrics against steps, train and eval together, several runs overlaid.
--out DIR: where the PNGs go (default: RUN_DIR/plots for one run, ./plots for several)."""


def plot_command(args: List[str]) -> int:
    """``alignctl plot``: returns the exit code."""
    from alignctl.tracking import console, read_metrics

    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    out = None
    run_dirs: List[Path] = []
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg == "--out" or arg.startswith("--out="):
            value = arg.partition("=")[2] if "=" in arg else (rest.pop(0) if rest else "")
            if not value:
                raise ConfigError("--out needs a folder, e.g. --out plots/compare")
            out = Path(value)
        elif arg.startswith("-"):
            raise ConfigError(f"alignctl plot: unknown option {arg!r}; {USAGE.splitlines()[0]}")
        else:
            run_dirs.append(Path(arg))
    if not run_dirs:
        raise ConfigError(f"alignctl plot: name at least one run directory; {USAGE.splitlines()[0]}")
    runs: Dict[str, List[dict]] = {}
    for run_dir in run_dirs:
        if not (run_dir / "metrics.jsonl").is_file():
            raise ConfigError(f"{run_dir}: no metrics.jsonl there; name a run directory written by `alignctl train`")
        name = run_dir.resolve().name
        while name in runs:  # two runs of the same folder name in different places
            name += "'"
        runs[name] = read_metrics(run_dir)
    out_dir = out or (run_dirs[0] / "plots" if len(run_dirs) == 1 else Path("plots"))
    try:
        written = write_plots(runs, out_dir)
    except OSError as exc:
        raise ConfigError(f"alignctl plot: cannot write into {out_dir} ({exc.strerror or exc}); pass --out a writable folder") from None
    if not written:
        raise ConfigError(f"nothing to plot: {', '.join(map(str, run_dirs))} logged no numeric metrics yet")
    console.print(f"wrote {len(written)} plots into {out_dir} (overview: {written[0]})", highlight=False, soft_wrap=True)
    return 0
