"""DDPO throughput on the tiny pipeline (or any diffusers pipeline): images/s for sampling and for
training, and the time split between sampling, reward and update, from the run's metrics.jsonl.

    python benchmarks/ddpo_throughput.py                       # tiny pipeline, CPU
    python benchmarks/ddpo_throughput.py model=sd15 algo.resolution=512 train.max_steps=2   # on a GPU

Extra arguments are alignctl overrides. The median over steps 2..N is shown (step 1 warms up).
Sampling images/s counts every image sampled; training images/s counts image x trained denoising
step pairs divided by the trained steps, i.e. images fully trained per second.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = ["recipe=smoke/ddpo", "algo.sample_num_steps=8", "algo.sample_batch_size=4",
            "algo.sample_num_batches_per_epoch=2", "algo.train_batch_size=4", "train.max_steps=5"]


def main() -> None:
    overrides = DEFAULTS + sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "alignctl.cli", "train", *overrides, "train.logging_steps=1",
               "run.progress=false", f"run.output_dir={out}"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(proc.stderr[-3000:])
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        config = (out / "config.yaml").read_text()
    images = next(int(line.split(":")[1]) for line in config.splitlines() if line.strip().startswith("sample_batch_size"))
    batches = next(int(line.split(":")[1]) for line in config.splitlines() if line.strip().startswith("sample_num_batches_per_epoch"))
    per_step = images * batches
    timed = records[1:] or records
    phase = {k: statistics.median(r[f"time/{k}"] for r in timed) for k in ("sample", "reward", "update")}
    total = sum(phase.values())
    print(f"DDPO, {per_step} images per step, median of steps 2..{len(records)}: "
          + ", ".join(f"{k} {v:.2f} s ({v / total:.0%})" for k, v in phase.items()))
    print(f"sampling {per_step / phase['sample']:.1f} images/s, training {per_step / phase['update']:.1f} images/s, "
          f"whole step {per_step / total:.1f} images/s")


if __name__ == "__main__":
    main()
