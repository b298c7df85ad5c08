"""Peak memory and time (forward + backward) of the lean chunked log-prob path vs the naive full-logits path.

Two lean variants: ``lean`` (a plain linear head takes the fused head with its hand-written backward,
``alignctl/models/head_logps.py``) and ``generic`` (every chunk through autograd under
``torch.utils.checkpoint``, what LoRA-on-head or soft-capped models take).

Each path runs in a fresh subprocess on the same randomly initialised Llama-architecture model (SmolLM2-like:
tied embeddings, large vocabulary; the real SmolLM2-135M is --vocab 49152 --hidden 576 --layers 30).

Peak memory:
* CPU: after building the model and the batch, the worker resets the kernel's peak-RSS counter
  (``echo 5 > /proc/self/clear_refs``) and reports ``VmHWM - VmRSS(baseline)``; where that reset is unavailable it
  falls back to ``ru_maxrss - VmRSS(baseline)`` (which may include the model-build peak: an upper bound).
* CUDA: ``torch.cuda.max_memory_allocated() - memory_allocated()`` after ``reset_peak_memory_stats``.

Agreement: the parent compares sum_logps, logits_sum and all parameter gradients of the lean runs against the
plain run (max abs diff and max diff relative to the largest magnitude).

    python benchmarks/logps_memory.py                      # ~1 min on 2 CPU cores
    python benchmarks/logps_memory.py --layers 30 --batch 4 --seq 512 --chunk-size 1024 256
    python benchmarks/logps_memory.py --autocast --chunk-size 256 --tolerance 2e-2   # fp32 weights, bf16 autocast
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _build(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    heads = max(1, args.hidden // 64)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or int(args.hidden * 8 / 3 // 64 * 64),
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 3) if heads % 3 == 0 else heads,
        max_position_embeddings=max(2048, args.seq),
        tie_word_embeddings=True,
        rope_theta=100000.0,
        pad_token_id=0,
    )
    dtype = getattr(torch, args.dtype)
    model = LlamaForCausalLM(config).to(device=args.device, dtype=dtype).train()

    g = torch.Generator().manual_seed(args.seed + 1)
    B, T = args.batch, args.seq
    input_ids = torch.randint(1, args.vocab, (B, T), generator=g)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    labels = input_ids.clone()
    prompt = int(T * args.prompt_frac)
    labels[:, :prompt] = -100  # prompt
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)  # right padding, different lengths
    lengths[0] = T
    for i, n in enumerate(lengths.tolist()):
        input_ids[i, n:] = 0
        attention_mask[i, n:] = 0
        labels[i, n:] = -100
    batch = [t.to(args.device) for t in (input_ids, attention_mask, labels)]
    return model, batch


def worker(args) -> None:
    import torch

    from alignctl.models import logps
    from alignctl.models.logps import plain_sequence_logps, sequence_logps, token_nll

    if args.worker == "generic":
        logps.fused_head_applies = lambda head: False
    torch.set_num_threads(args.threads or torch.get_num_threads())
    model, (input_ids, attention_mask, labels) = _build(args)
    fn = plain_sequence_logps if args.worker == "plain" else sequence_logps
    cuda = args.device.startswith("cuda")

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        peak_method = "cuda max_memory_allocated"
    else:
        reset_ok = _reset_peak_rss()
        base = (_status_kb("VmRSS") or 0) * 1024
        peak_method = "VmHWM after clear_refs" if reset_ok else "ru_maxrss (includes build peak)"

    times = []
    out = None
    if args.no_grad:  # a reference-model forward: no autograd graph at all
        model.eval()
    for _ in range(args.repeats):
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad() if args.no_grad else contextlib.nullcontext(), torch.autocast(
            args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.autocast
        ):
            out = fn(model, input_ids, attention_mask, labels, chunk_size=args.chunk_size)
        if not args.no_grad:
            token_nll(out).backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)

    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        hwm = _status_kb("VmHWM") if peak_method.startswith("VmHWM") else None
        peak_kb = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = peak_kb * 1024 - base

    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    torch.save(
        {
            "sum_logps": out.sum_logps.detach().float().cpu(),
            "logits_sum": out.logits_sum.float().cpu(),
            "num_tokens": out.num_tokens.cpu(),
            "grads": grads,
        },
        args.out,
    )
    print(json.dumps({"times": times, "peak_bytes": peak, "peak_method": peak_method}))


def _run_worker(path: str, chunk_size: int, args, out_file: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", path, "--out", out_file]
    cmd += ["--chunk-size", str(chunk_size)]
    for k in ("vocab", "hidden", "intermediate", "layers", "batch", "seq", "repeats", "seed", "threads"):
        cmd += [f"--{k}", str(getattr(args, k))]
    cmd += ["--prompt-frac", str(args.prompt_frac), "--device", args.device, "--dtype", args.dtype]
    for flag in ("no_grad", "autocast"):
        if getattr(args, flag):
            cmd.append("--" + flag.replace("_", "-"))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"worker {path} failed (rc={proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=0, help="0: SmolLM2-like (1536 for hidden 576)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--chunk-size", type=int, nargs="+", default=[1024, 256], help="one lean run per value")
    p.add_argument("--repeats", type=int, default=2, help="forward+backward iterations per path (time = min)")
    p.add_argument("--prompt-frac", type=float, default=0.25, help="leading fraction of each row masked as prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--device", default=None, help="default: cuda if available else cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--no-grad", action="store_true", help="forward only, as for a reference model")
    p.add_argument("--autocast", action="store_true", help="bf16 autocast around forward (fp32 weights)")
    p.add_argument("--tolerance", type=float, default=1e-5, help="max relative difference to the plain path")
    p.add_argument("--worker", choices=["plain", "lean", "generic"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.device is None or args.dtype is None:
        import torch

        args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")

    if args.worker:
        args.chunk_size = args.chunk_size[0] if isinstance(args.chunk_size, list) else args.chunk_size
        worker(args)
        return

    import torch

    runs = [("plain", args.chunk_size[0])] + [(path, c) for c in args.chunk_size for path in ("lean", "generic")]
    print(
        f"model: Llama vocab={args.vocab} hidden={args.hidden} layers={args.layers} (tied), "
        f"batch={args.batch} seq={args.seq} prompt_frac={args.prompt_frac}, "
        f"device={args.device} dtype={args.dtype}{' + bf16 autocast' if args.autocast else ''} threads={args.threads or torch.get_num_threads()}, "
        f"repeats={args.repeats}, {'forward only (no grad)' if args.no_grad else 'forward + backward'}"
    )
    full_logits_mb = args.batch * args.seq * args.vocab * 4 / 2**20
    print(f"(one fp32 [batch, seq, vocab] logits tensor = {full_logits_mb:.0f} MB)")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        ref = None
        for path, chunk in runs:
            out_file = os.path.join(tmp, f"{path}_{chunk}.pt")
            info = _run_worker(path, chunk, args, out_file)
            data = torch.load(out_file, weights_only=True)
            if ref is None:
                ref = data
                abs_diff = rel_diff = 0.0
            else:
                abs_diff = rel_diff = 0.0
                pairs = [(data["sum_logps"], ref["sum_logps"]), (data["logits_sum"], ref["logits_sum"])]
                pairs += [(data["grads"][n], g) for n, g in ref["grads"].items()]
                assert torch.equal(data["num_tokens"], ref["num_tokens"])
                assert data["grads"].keys() == ref["grads"].keys()
                for a, b in pairs:
                    d = (a - b).abs().max().item()
                    abs_diff = max(abs_diff, d)
                    rel_diff = max(rel_diff, d / max(b.abs().max().item(), 1e-12))
            label = "plain (full logits)" if path == "plain" else f"{path} (chunk={chunk})"
            results.append((label, min(info["times"]), info["peak_bytes"] / 2**20, abs_diff, rel_diff))
            method = info["peak_method"]
        n_tok = int(ref["num_tokens"].sum())

    print(f"label tokens: {n_tok}; peak memory = {method}, growth over the built model + batch")
    header = f"{'path':<22} {'time s':>8} {'peak MB':>9} {'max abs diff':>13} {'max rel diff':>13}"
    print(header)
    print("-" * len(header))
    for label, t, mb, d, r in results:
        print(f"{label:<22} {t:>8.2f} {mb:>9.0f} {d:>13.2e} {r:>13.2e}")
    ok = all(r <= args.tolerance for *_, r in results)
    print(
        f"agreement (sum_logps, logits_sum, all grads; max |diff| / max |plain| <= {args.tolerance:g}):",
        "OK" if ok else "MISMATCH",
    )
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
