"""The offline loop driver (SFT, reward modelling, DPO, CPO, ORPO, KTO).

The driver owns everything around a step: accelerator, optimizer and schedule, gradient
accumulation and clipping, evaluation, logging, checkpoints and the final save. An algorithm
plugs in through ``OfflineAlgorithm``: it turns rows into examples, sets up what it needs beside
the policy (a reference model, a hook), and computes a loss and metrics for a batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Protocol, Tuple

import torch
from omegaconf import DictConfig

from alignctl.checkpoint import save_checkpoint, write_atomically
from alignctl.errors import ConfigError
from alignctl.run_dir import FINAL_MODEL, resolve_run_dir, write_config
from alignctl.tracking import RunTracker, print_summary

Metrics = Dict[str, torch.Tensor]


@dataclass
class PreparedData:
    train: List
    eval: Optional[List]
    collate: Callable[[List], Dict[str, torch.Tensor]]
    # Extra rows for the end-of-run summary (format, skipped rows, ...).
    notes: List[Tuple[str, str]] = field(default_factory=list)


class OfflineAlgorithm(Protocol):
    def prepare_data(self, job: DictConfig, tokenizer) -> PreparedData: ...

    def build_model(self, job: DictConfig, tokenizer) -> torch.nn.Module:
        """The module handed to accelerator.prepare (its forward is what DDP/FSDP wrap)."""

    def setup(self, job: DictConfig, accelerator, model: torch.nn.Module, data: PreparedData) -> None:
        """Anything beside the policy: reference model, reference log-probs, hooks."""

    def compute_loss(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor], train: bool) -> Tuple[torch.Tensor, Metrics]: ...

    def unwrap_for_save(self, model: torch.nn.Module) -> torch.nn.Module: ...


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    final_loss: float
    tokens: int
    wall_s: float


def check_precision(name: str) -> str:
    """accelerate's mixed_precision value for the precision preset, or a clear error."""
    if name == "fp32":
        return "no"
    if name == "bf16":
        return "bf16"
    if name == "fp16":
        if not torch.cuda.is_available():
            raise ConfigError("precision=fp16 needs a CUDA GPU (none here); use precision=bf16 or fp32 on CPU")
        return "fp16"
    raise ConfigError(f"precision.name={name!r}: use fp32, bf16 or fp16")


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (1-D parameters)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon
    )


SCHEDULERS = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def build_scheduler(optimizer, cfg, total_steps: int):
    from transformers import get_scheduler

    if cfg.lr_scheduler not in SCHEDULERS:
        raise ConfigError(f"train.lr_scheduler={cfg.lr_scheduler!r}: use one of {', '.join(SCHEDULERS)}")
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    return get_scheduler(SCHEDULERS[cfg.lr_scheduler], optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def plan_steps(cfg, batches_per_epoch: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    updates_per_epoch = max(1, math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps))
    return max(1, math.ceil(cfg.num_epochs * updates_per_epoch))


def run_offline(job: DictConfig, algorithm: OfflineAlgorithm, title: str) -> RunResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from alignctl.models.load import load_tokenizer

    tcfg = job.train
    mixed_precision = check_precision(job.precision.name)
    run_dir = resolve_run_dir(job)
    _fresh_accelerator_state()
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=tcfg.gradient_accumulation_steps)
    set_seed(tcfg.seed)
    if accelerator.is_main_process:
        write_config(job, run_dir)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)

    tokenizer = load_tokenizer(job.model)
    data = algorithm.prepare_data(job, tokenizer)
    model = algorithm.build_model(job, tokenizer)
    algorithm.setup(job, accelerator, model, data)

    train_loader = _loader(data.train, data.collate, tcfg.per_device_batch_size, shuffle=True, seed=tcfg.seed)
    eval_loader = None
    if data.eval:
        eval_bs = tcfg.per_device_eval_batch_size or tcfg.per_device_batch_size
        eval_loader = _loader(data.eval, data.collate, eval_bs, shuffle=False, seed=tcfg.seed)

    optimizer = build_optimizer(model, tcfg)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    total_steps = plan_steps(tcfg, len(train_loader))
    scheduler = build_scheduler(optimizer, tcfg, total_steps)

    tracker = RunTracker(
        run_dir, total_steps, enabled=accelerator.is_main_process, progress=job.run.progress, tensorboard=job.run.tensorboard
    )
    model.train()
    step, tokens_total, last_loss = 0, 0, float("nan")
    window = _Window()
    start = time.perf_counter()
    with tracker:
        while step < total_steps:
            for batch in train_loader:
                with accelerator.accumulate(model):
                    loss, metrics = algorithm.compute_loss(model, batch, train=True)
                    accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients and tcfg.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), tcfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                window.add(loss.detach(), metrics, batch["seq_lengths"].sum())
                if not accelerator.sync_gradients:
                    continue
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                step += 1
                if grad_norm is not None:
                    window.grad_norm = grad_norm
                if step == 1 or step % tcfg.logging_steps == 0 or step == total_steps:
                    record, tokens = window.flush(accelerator)
                    tokens_total += tokens
                    last_loss = record["loss"]
                    record.update(lr=lr, epoch=step / max(1, len(train_loader) / tcfg.gradient_accumulation_steps))
                    tracker.log(step, record)
                    tracker.advance(step, record["loss"], lr, record["tokens_per_s"])
                if eval_loader is not None and tcfg.eval_steps > 0 and step % tcfg.eval_steps == 0 and step < total_steps:
                    tracker.log(step, evaluate(algorithm, model, eval_loader, accelerator), split="eval")
                if tcfg.save_steps > 0 and step % tcfg.save_steps == 0 and step < total_steps:
                    _save_checkpoint(run_dir, step, algorithm, model, tokenizer, optimizer, scheduler, accelerator, tcfg)
                if step >= total_steps:
                    break
        wall = time.perf_counter() - start
        eval_record = evaluate(algorithm, model, eval_loader, accelerator) if eval_loader is not None else None
        if eval_record:
            tracker.log(step, eval_record, split="eval")
    final_dir = run_dir / FINAL_MODEL
    if accelerator.is_main_process:
        unwrapped = algorithm.unwrap_for_save(accelerator.unwrap_model(model))
        merge = bool(job.peft.merge_on_save) and job.peft.method != "none"

        def write_final(folder: Path) -> None:
            from alignctl.models.policy import save_model

            save_model(unwrapped, tokenizer, folder, merge_adapter=merge)
            write_config(job, folder)

        write_atomically(final_dir, write_final)
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        rows = [
            ("algorithm", title),
            ("steps", str(step)),
            ("global batch", str(tcfg.per_device_batch_size * tcfg.gradient_accumulation_steps * accelerator.num_processes)),
            ("tokens", f"{tokens_total:,}"),
            ("wall time", f"{wall:.1f} s"),
            ("tokens/s", f"{tokens_total / max(wall, 1e-9):,.1f}"),
            ("final train loss", f"{last_loss:.4f}"),
        ]
        if eval_record:
            rows.append(("final eval loss", f"{eval_record['loss']:.4f}"))
        rows += data.notes
        rows += [("run directory", str(run_dir)), ("model saved to", str(final_dir))]
        print_summary("alignctl run summary", rows)
    return RunResult(run_dir=run_dir, steps=step, final_loss=last_loss, tokens=tokens_total, wall_s=wall)


def _fresh_accelerator_state() -> None:
    """accelerate keeps one process-wide state; a second run in the same process (tests, notebooks)
    may ask for another precision. Outside a multi-process launch, start from a clean state."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    if PartialState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def evaluate(algorithm: OfflineAlgorithm, model, loader, accelerator) -> Dict[str, float]:
    """Mean of every metric over the eval set (batch means, averaged over batches and processes)."""
    model.eval()
    window = _Window()
    with torch.no_grad():
        for batch in loader:
            loss, metrics = algorithm.compute_loss(model, batch, train=False)
            window.add(loss.detach(), metrics, batch["seq_lengths"].sum())
    model.train()
    record, _ = window.flush(accelerator)
    record.pop("tokens_per_s", None)
    return record


class _Window:
    """Sums of metrics over the micro-batches since the last flush (tensors: no sync per step)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: Metrics = {}
        self.count = 0
        self.tokens = torch.zeros((), dtype=torch.long)
        self.grad_norm = None
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, metrics: Metrics, tokens: torch.Tensor) -> None:
        for key, value in {"loss": loss, **metrics}.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.count += 1
        self.tokens = self.tokens + tokens.cpu()

    def flush(self, accelerator) -> Tuple[Dict[str, float], int]:
        keys = sorted(self.sums)
        stacked = torch.stack([self.sums[k] for k in keys]) / max(self.count, 1)
        stacked = accelerator.reduce(stacked.to(accelerator.device), reduction="mean")
        tokens = int(accelerator.reduce(self.tokens.to(accelerator.device), reduction="sum"))
        elapsed = time.perf_counter() - self.started
        record = {k: float(v) for k, v in zip(keys, stacked.tolist())}
        record["tokens_per_s"] = tokens / max(elapsed, 1e-9)
        if self.grad_norm is not None:
            record["grad_norm"] = float(self.grad_norm)
        self.reset()
        return record, tokens


def _loader(examples, collate, batch_size: int, shuffle: bool, seed: int):
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.utils.data.DataLoader(
        examples, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=generator
    )


def _save_checkpoint(run_dir, step, algorithm, model, tokenizer, optimizer, scheduler, accelerator, tcfg) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = algorithm.unwrap_for_save(accelerator.unwrap_model(model))

        def write(folder: Path) -> None:
            from alignctl.models.policy import save_model

            save_model(unwrapped, tokenizer, folder / "model")
            torch.save(optimizer.state_dict(), folder / "optimizer.pt")
            torch.save(scheduler.state_dict(), folder / "scheduler.pt")

        save_checkpoint(run_dir, step, write, {"seed": tcfg.seed}, keep=tcfg.save_total_limit)
    accelerator.wait_for_everyone()
