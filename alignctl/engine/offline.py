"""The offline loop: epochs over a fixed data set (SFT, reward modelling, DPO, CPO, ORPO, KTO).

Built on the run shell (``engine.run``), it owns the data loaders, the micro-step (forward,
backward, accumulation, clipping) and evaluation. An algorithm plugs in through
``OfflineAlgorithm``: it turns rows into examples, sets up what it needs beside the policy (a
reference model, a hook), and computes a loss and metrics for a batch. Throughput is counted in
real (non-padding) tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Protocol, Tuple

import torch
from omegaconf import DictConfig

from alignctl.data.collate import example_length
from alignctl.engine.guards import loss_is_finite
from alignctl.engine.heap import heap_trimmer, trim_during_backward
from alignctl.engine.memory_plan import plan_checkpointing
from alignctl.engine.optim import build_optimizer, build_scheduler, plan_steps
from alignctl.engine.run import RunResult, RunShell
from alignctl.engine.window import Metrics, MetricWindow
from alignctl.models.logps import unwrap_causal_lm
from alignctl.models.tied_embedding_grad import defer_tied_embedding_grad

__all__ = ["Metrics", "OfflineAlgorithm", "PreparedData", "RunResult", "EpochSampler", "run_offline"]


@dataclass
class PreparedData:
    train: List
    eval: Optional[List]
    collate: Callable[[List], Dict[str, torch.Tensor]]
    # Extra rows for the end-of-run summary (format, skipped rows, ...).
    notes: List[Tuple[str, str]] = field(default_factory=list)
    # Where the eval rows came from, or why there are none (data.load.RawSplits.eval_origin).
    eval_origin: str = ""


class OfflineAlgorithm(Protocol):
    # Optional attribute ``token_level_loss = True``: the loss is a mean NLL per token, so the loop
    # warns when it sits at ln(vocab) (uniform predictions).
    def prepare_data(self, job: DictConfig, tokenizer) -> PreparedData: ...

    def build_model(self, job: DictConfig, tokenizer) -> torch.nn.Module:
        """The module handed to accelerator.prepare (its forward is what DDP/FSDP wrap)."""

    def setup(self, job: DictConfig, accelerator, model: torch.nn.Module, data: PreparedData) -> None:
        """Anything beside the policy: reference model, reference log-probs, hooks."""

    def compute_loss(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor], train: bool) -> Tuple[torch.Tensor, Metrics]: ...

    def unwrap_for_save(self, model: torch.nn.Module) -> torch.nn.Module: ...


class EpochSampler(torch.utils.data.Sampler):
    """A shuffle that depends only on (seed, epoch), so a resumed run sees the same data order.

    With ``lengths`` (train.group_by_length) the shuffled order is cut into mega-batches of
    ``group`` examples, each sorted by length, so a batch holds examples of similar length and
    little padding, while the order stays random at the mega-batch scale.
    """

    def __init__(self, size: int, seed: int, lengths: Optional[List[int]] = None, group: int = 0) -> None:
        self.size, self.seed, self.epoch = size, seed, 0
        self.lengths, self.group = lengths, group

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        if self.lengths is None or self.group <= 1:
            return iter(order)
        grouped: List[int] = []
        for start in range(0, self.size, self.group):
            grouped += sorted(order[start : start + self.group], key=lambda i: -self.lengths[i])
        return iter(grouped)

    def __len__(self) -> int:
        return self.size


def run_offline(job: DictConfig, algorithm: OfflineAlgorithm, title: str) -> RunResult:
    return OfflineLoop(job, algorithm, title).run()


class OfflineLoop(RunShell):
    unit = "tokens"

    def accumulation_steps(self) -> int:
        return self.tcfg.gradient_accumulation_steps

    # ------------------------------------------------------------------ set-up
    def build(self) -> None:
        from alignctl.models.load import load_tokenizer

        job, tcfg, accelerator = self.job, self.tcfg, self.accelerator
        tokenizer = load_tokenizer(job.model)
        self.processors = [tokenizer]
        self.data = self.algorithm.prepare_data(job, tokenizer)
        self.data.notes.extend(self.notes)
        self.notes = self.data.notes  # one list: set-up (reference precompute, resume) adds to it
        model = self.algorithm.build_model(job, tokenizer)
        self.algorithm.setup(job, accelerator, model, self.data)
        # a reference the algorithm holds in memory (DPO's / KTO's frozen copy) counts in the estimate
        reference = getattr(getattr(self.algorithm, "reference", None), "model", None)
        plan_checkpointing(job, self.algorithm.unwrap_for_save(model), [reference], accelerator.device, self.notes)
        if accelerator.num_processes == 1 and defer_tied_embedding_grad(unwrap_causal_lm(model)):
            self.notes.append(("tied embedding gradient", "added row by row into the LM head's gradient"))
        if getattr(self.algorithm, "token_level_loss", False):  # mean NLL per token: uniform = ln(vocab)
            self.uniform_loss = _uniform_loss(self.algorithm.unwrap_for_save(model))

        train_loader = torch.utils.data.DataLoader(
            self.data.train,
            batch_size=tcfg.per_device_batch_size,
            sampler=self._sampler(),
            collate_fn=self.data.collate,
        )
        eval_loader = None
        if self.data.eval:
            eval_bs = tcfg.per_device_eval_batch_size or tcfg.per_device_batch_size
            eval_loader = torch.utils.data.DataLoader(self.data.eval, batch_size=eval_bs, collate_fn=self.data.collate)

        from alignctl.engine.samples import SampleGenerations

        self.samples = SampleGenerations.from_job(job, tokenizer, self.data.train, self.data.eval)
        optimizer = build_optimizer(model, tcfg)
        self.model, self.optimizer, self.train_loader = accelerator.prepare(model, optimizer, train_loader)
        self.eval_loader = accelerator.prepare(eval_loader) if eval_loader is not None else None
        self.total_steps = plan_steps(tcfg, len(self.train_loader))
        self.scheduler = build_scheduler(self.optimizer, tcfg, self.total_steps)
        self.last_padding = float("nan")
        self.trim_heap = heap_trimmer(tcfg.trim_heap, accelerator.device)
        if self.trim_heap is not None:
            trim_during_backward(self.model, self.trim_heap)
            self.notes.append(("heap trimming", "on: free heap pages go back to the system before and during each backward pass"))

    def _sampler(self) -> EpochSampler:
        tcfg = self.tcfg
        if not tcfg.group_by_length:
            return EpochSampler(len(self.data.train), tcfg.seed)
        lengths = [example_length(e) for e in self.data.train]
        group = tcfg.per_device_batch_size * self.accelerator.num_processes * tcfg.length_group_batches
        return EpochSampler(len(lengths), tcfg.seed, lengths, group)

    # ------------------------------------------------------------------ the loop
    def train(self) -> None:
        self.model.train()
        after_step = getattr(self.algorithm, "after_step", None)  # e.g. TR-DPO's reference sync
        for batch in self.batches(self.train_loader):
            if self._micro_step(batch):  # an optimizer step completed
                if after_step is not None:
                    after_step(self.progress.step + 1, self.model)
                self.end_step()

    def _micro_step(self, batch: Dict[str, torch.Tensor]) -> bool:
        """Forward/backward one micro-batch; True when an optimizer step completed."""
        accelerator, tcfg = self.accelerator, self.tcfg
        with accelerator.accumulate(self.model):
            loss, metrics = self.algorithm.compute_loss(self.model, batch, train=True)
            if not loss_is_finite(loss, accelerator):
                rows = batch["row_index"].tolist() if "row_index" in batch else []
                self.handle_nonfinite(loss, rows)
                return False
            if self.trim_heap is not None:  # the forward's temporaries are freed; its holes go back
                self.trim_heap()
            accelerator.backward(loss)
            if accelerator.sync_gradients and tcfg.max_grad_norm > 0:
                self.window.grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), tcfg.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.trim_heap is not None and accelerator.sync_gradients:  # the freed gradients' pages
                self.trim_heap()
        real_tokens = batch["seq_lengths"].sum()
        metrics = {**metrics, "padding": 1 - real_tokens.float() / batch["input_ids"].numel()}
        self.window.add(loss.detach(), metrics, real_tokens)
        return accelerator.sync_gradients

    def log_extras(self) -> Dict[str, float]:
        progress = self.progress
        self.last_padding = self.last_record.get("padding", float("nan"))
        return {"epoch": progress.epoch + progress.batch_in_epoch / max(1, len(self.train_loader))}

    def evaluate(self) -> Optional[Dict[str, float]]:
        """Mean of every metric over the eval set (batch means, averaged over batches and processes)."""
        if self.eval_loader is None:
            return None
        with self.tracker.task(f"eval @ step {self.progress.step}", len(self.eval_loader)) as bar:
            record = evaluate_batches(self.algorithm, self.model, self.eval_loader, self.accelerator, self.unit,
                                      on_batch=bar.advance)
        self.model.train()
        return record

    def show_samples(self) -> None:
        if self.samples is not None:
            self.samples.show(self)

    # ------------------------------------------------------------------ summary
    def summary_rows(self) -> List[Tuple[str, str]]:
        tcfg = self.tcfg
        processes = self.accelerator.num_processes
        global_batch = tcfg.per_device_batch_size * tcfg.gradient_accumulation_steps * processes
        n_eval = len(self.data.eval or [])
        origin = self.data.eval_origin  # says so when dataset.max_eval_rows capped it
        rows = [("global batch", f"{global_batch} ({processes} process(es))"),
                ("train / eval examples", f"{len(self.data.train):,} / {n_eval:,}" + (f" (eval: {origin})" if origin else ""))]
        if self.samples is not None:
            rows.append(("sample generations", f"{self.samples.origin}, at each evaluation -> samples.jsonl"))
        return rows

    def summary_values(self) -> Dict[str, object]:
        return {"train_examples": len(self.data.train), "eval_examples": len(self.data.eval or [])}

    def late_summary_rows(self) -> List[Tuple[str, str]]:
        return [("padding", f"{self.last_padding:.0%} of batch positions (last logging window)")]


def _uniform_loss(model: torch.nn.Module) -> Optional[float]:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return math.log(vocab) if isinstance(vocab, int) and vocab > 1 else None


def evaluate_batches(algorithm, model, loader, accelerator, unit: str = "tokens",
                     on_batch: Optional[Callable[[], None]] = None) -> Dict[str, float]:
    """Mean of every metric of ``algorithm.compute_loss`` over ``loader`` (batch means, averaged over
    batches and processes), the model in eval mode: the loop's evaluation and `alignctl eval`."""
    model.eval()
    window = MetricWindow(unit)
    with torch.no_grad():
        for batch in loader:
            loss, metrics = algorithm.compute_loss(model, batch, train=False)
            window.add(loss.detach(), metrics, batch["seq_lengths"].sum())
            if on_batch is not None:
                on_batch()
    record, _ = window.flush(accelerator)
    record.pop(f"{unit}_per_s", None)
    return record
