"""The offline loop driver (SFT, reward modelling, DPO, CPO, ORPO, KTO).

The driver owns everything around a step: accelerator, optimizer and schedule, gradient
accumulation and clipping, evaluation, logging, checkpoints, resume, stop signals, non-finite
losses and the final save. An algorithm plugs in through ``OfflineAlgorithm``: it turns rows into
examples, sets up what it needs beside the policy (a reference model, a hook), and computes a
loss and metrics for a batch.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Tuple

import torch
from omegaconf import DictConfig

from alignctl.checkpoint import checkpoint_path, find_resume_checkpoint, list_checkpoints, save_checkpoint, write_atomically
from alignctl.data.collate import example_length
from alignctl.errors import ConfigError
from alignctl.loops.guards import NonFiniteLoss, RunInterrupted, StopSignals, loss_is_finite, nonfinite_message
from alignctl.loops.optim import build_optimizer, build_scheduler, check_precision, plan_steps
from alignctl.loops.state import TrainProgress, read_training_state, restore_rng, write_training_state
from alignctl.loops.window import Metrics, MetricWindow
from alignctl.run_dir import FINAL_MODEL, resolve_run_dir, write_config
from alignctl.tracking import RunTracker, print_summary, truncate_metrics


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
    tokens: int  # trained by this process (a resumed run counts from where it resumed)
    wall_s: float


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
    return _OfflineRun(job, algorithm, title).run()


class _OfflineRun:
    def __init__(self, job: DictConfig, algorithm: OfflineAlgorithm, title: str) -> None:
        self.job, self.algorithm, self.title = job, algorithm, title
        self.tcfg = job.train

    # ------------------------------------------------------------------ set-up
    def run(self) -> RunResult:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from alignctl.models.load import load_tokenizer

        job, tcfg = self.job, self.tcfg
        mixed_precision = check_precision(job.precision.name)
        self.run_dir = resolve_run_dir(job, resuming=bool(job.resume))
        resume_from = find_resume_checkpoint(self.run_dir, job.resume) if job.resume else None
        _fresh_accelerator_state()
        self.accelerator = accelerator = Accelerator(
            mixed_precision=mixed_precision, gradient_accumulation_steps=tcfg.gradient_accumulation_steps
        )
        set_seed(tcfg.seed)
        self._check_sharded_options()
        if accelerator.is_main_process:
            write_config(job, self.run_dir)
            if resume_from is None:
                (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)

        self.tokenizer = load_tokenizer(job.model)
        self.data = self.algorithm.prepare_data(job, self.tokenizer)
        model = self.algorithm.build_model(job, self.tokenizer)
        self.algorithm.setup(job, accelerator, model, self.data)
        resumed = read_training_state(resume_from, model) if resume_from else None

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

        optimizer = build_optimizer(model, tcfg)
        self.model, self.optimizer, self.train_loader = accelerator.prepare(model, optimizer, train_loader)
        self.eval_loader = accelerator.prepare(eval_loader) if eval_loader is not None else None
        self.total_steps = plan_steps(tcfg, len(self.train_loader))
        self.scheduler = build_scheduler(self.optimizer, tcfg, self.total_steps)
        self.progress = TrainProgress()
        self.window = MetricWindow()
        if resumed:
            self._restore(resumed, resume_from)
        return self._train_and_finish()

    def _sampler(self) -> EpochSampler:
        tcfg = self.tcfg
        if not tcfg.group_by_length:
            return EpochSampler(len(self.data.train), tcfg.seed)
        lengths = [example_length(e) for e in self.data.train]
        group = tcfg.per_device_batch_size * self.accelerator.num_processes * tcfg.length_group_batches
        return EpochSampler(len(lengths), tcfg.seed, lengths, group)

    def _restore(self, resumed: Dict[str, Any], folder: Path) -> None:
        self.optimizer.load_state_dict(resumed["optimizer"])
        self.scheduler.load_state_dict(resumed["scheduler"])
        self.window.load_state_dict(resumed["window"], self.accelerator.device)
        self.progress = resumed["progress"]
        if hasattr(self.algorithm, "load_state_dict"):
            self.algorithm.load_state_dict(resumed["algorithm"])
        restore_rng(resumed["rng"])
        if self.accelerator.is_main_process:
            truncate_metrics(self.run_dir, after_step=self.progress.step)
        self.data.notes.append(("resumed from", f"{folder} (step {self.progress.step})"))

    # ------------------------------------------------------------------ the loop
    def _train_and_finish(self) -> RunResult:
        job, accelerator, progress = self.job, self.accelerator, self.progress
        self.tracker = RunTracker(
            self.run_dir, self.total_steps, enabled=accelerator.is_main_process,
            progress=job.run.progress, tensorboard=job.run.tensorboard,
        )
        self.model.train()
        self.last_loss = self.last_padding = float("nan")
        self.tokens_before = progress.tokens_total  # > 0 when resumed: not part of this process's speed
        start = time.perf_counter()
        with self.tracker, StopSignals() as stop:
            if progress.step:  # resumed: start the bar where the run stopped
                self.tracker.advance(progress.step, self.last_loss, self.scheduler.get_last_lr()[0], 0.0)
            while progress.step < self.total_steps:
                # accelerate's loader passes its epoch on to our sampler at each pass: set it, so a
                # resumed run continues the right epoch's order.
                self.train_loader.set_epoch(progress.epoch)
                # On resume, pass over the micro-batches this epoch already used (collated, not run).
                loader = itertools.islice(iter(self.train_loader), progress.batch_in_epoch, None)
                for batch in loader:
                    progress.batch_in_epoch += 1
                    stepped = self._micro_step(batch)
                    if not stepped:
                        continue
                    self._after_step()
                    if stop.any_process(accelerator):
                        path = self._save_checkpoint()
                        raise RunInterrupted(
                            f"stopped by {stop.signal_name or 'a signal'} after step {progress.step}; checkpoint "
                            f"{path}; continue with the same command plus resume=auto "
                            f"run.output_dir={self.run_dir}"
                        )
                    if progress.step >= self.total_steps:
                        break
                else:
                    progress.epoch += 1
                    progress.batch_in_epoch = 0
            wall = time.perf_counter() - start
            eval_record = self._evaluate() if self.eval_loader is not None else None
            if eval_record:
                self.tracker.log(progress.step, eval_record, split="eval")
        final_dir = self._save_final()
        self._print_summary(wall, eval_record, final_dir)
        return RunResult(self.run_dir, progress.step, self.last_loss, progress.tokens_total - self.tokens_before, wall)

    def _micro_step(self, batch: Dict[str, torch.Tensor]) -> bool:
        """Forward/backward one micro-batch; True when an optimizer step completed."""
        accelerator, tcfg = self.accelerator, self.tcfg
        with accelerator.accumulate(self.model):
            loss, metrics = self.algorithm.compute_loss(self.model, batch, train=True)
            if not loss_is_finite(loss, accelerator):
                self._handle_nonfinite(loss, batch)
                return False
            accelerator.backward(loss)
            if accelerator.sync_gradients and tcfg.max_grad_norm > 0:
                self.window.grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), tcfg.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        real_tokens = batch["seq_lengths"].sum()
        metrics = {**metrics, "padding": 1 - real_tokens.float() / batch["input_ids"].numel()}
        self.window.add(loss.detach(), metrics, real_tokens)
        return accelerator.sync_gradients

    def _handle_nonfinite(self, loss: torch.Tensor, batch: Dict[str, torch.Tensor]) -> None:
        if not self.tcfg.skip_nonfinite:
            found = list_checkpoints(self.run_dir)
            rows = batch["row_index"].tolist() if "row_index" in batch else []
            raise NonFiniteLoss(nonfinite_message(loss, self.progress.step, rows, str(found[-1]) if found else None))
        self.progress.skipped_nonfinite += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.accelerator.is_main_process:
            self.tracker.print(f"[yellow]skipped a batch with a non-finite loss at step {self.progress.step + 1}[/]")

    def _after_step(self) -> None:
        tcfg, progress = self.tcfg, self.progress
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        progress.step += 1
        step = progress.step
        if step == 1 or step % tcfg.logging_steps == 0 or step == self.total_steps:
            record, tokens = self.window.flush(self.accelerator)
            progress.tokens_total += tokens
            self.last_loss, self.last_padding = record["loss"], record["padding"]
            record.update(lr=lr, epoch=progress.epoch + progress.batch_in_epoch / max(1, len(self.train_loader)))
            if progress.skipped_nonfinite:
                record["skipped_nonfinite"] = progress.skipped_nonfinite
            self.tracker.log(step, record)
            self.tracker.advance(step, record["loss"], lr, record["tokens_per_s"])
        if self.eval_loader is not None and tcfg.eval_steps > 0 and step % tcfg.eval_steps == 0 and step < self.total_steps:
            self.tracker.log(step, self._evaluate(), split="eval")
        if tcfg.save_steps > 0 and step % tcfg.save_steps == 0 and step < self.total_steps:
            self._save_checkpoint()

    def _evaluate(self) -> Dict[str, float]:
        """Mean of every metric over the eval set (batch means, averaged over batches and processes)."""
        self.model.eval()
        window = MetricWindow()
        with torch.no_grad():
            for batch in self.eval_loader:
                loss, metrics = self.algorithm.compute_loss(self.model, batch, train=False)
                window.add(loss.detach(), metrics, batch["seq_lengths"].sum())
        self.model.train()
        record, _ = window.flush(self.accelerator)
        record.pop("tokens_per_s", None)
        return record

    # ------------------------------------------------------------------ saving
    def _save_checkpoint(self) -> Path:
        accelerator, progress = self.accelerator, self.progress
        accelerator.wait_for_everyone()
        path = checkpoint_path(self.run_dir, progress.step)
        gathered = self._gathered_weights()  # every process takes part when weights are sharded
        if accelerator.is_main_process:
            model = accelerator.unwrap_model(self.model)
            algorithm_state = self.algorithm.state_dict() if hasattr(self.algorithm, "state_dict") else None
            state: Dict[str, Any] = {}

            def write(folder: Path) -> None:
                from alignctl.models.policy import save_model

                save_model(self.algorithm.unwrap_for_save(model), self.tokenizer, folder / "model", state_dict=gathered)
                if gathered is None:  # sharded runs keep the weights only (see read_training_state)
                    state.update(
                        write_training_state(
                            folder, model, self.optimizer, self.scheduler, self.window.state_dict(), progress, algorithm_state
                        )
                    )

            save_checkpoint(self.run_dir, progress.step, write, state, keep=self.tcfg.save_total_limit)
        accelerator.wait_for_everyone()
        return path

    def _save_final(self) -> Path:
        final_dir = self.run_dir / FINAL_MODEL
        gathered = self._gathered_weights()
        if self.accelerator.is_main_process:
            unwrapped = self.algorithm.unwrap_for_save(self.accelerator.unwrap_model(self.model))
            merge = bool(self.job.peft.merge_on_save) and self.job.peft.method != "none"

            def write_final(folder: Path) -> None:
                from alignctl.models.policy import save_model

                save_model(unwrapped, self.tokenizer, folder, merge_adapter=merge, state_dict=gathered)
                write_config(self.job, folder)

            write_atomically(final_dir, write_final)
        self.accelerator.wait_for_everyone()
        return final_dir

    def _check_sharded_options(self) -> None:
        from accelerate.utils import DistributedType

        sharded = self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        if sharded and self.job.peft.merge_on_save and self.job.peft.method != "none":
            raise ConfigError(
                "peft.merge_on_save=true is not available under launcher=fsdp or deepspeed (the weights are "
                "sharded); train without it and merge the saved adapter afterwards (peft merge_and_unload)"
            )
        if sharded and self.job.resume:
            raise ConfigError("resume under launcher=fsdp or deepspeed is not supported yet (sharded optimizer state)")

    def _gathered_weights(self) -> Optional[Dict[str, torch.Tensor]]:
        """Under FSDP or DeepSpeed the weights are sharded: gather a full state dict (named as in the
        model that is saved) on the main process. None when every process holds whole weights."""
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            return None
        full = self.accelerator.get_state_dict(self.model)
        outer = self.accelerator.unwrap_model(self.model)
        saved = self.algorithm.unwrap_for_save(outer)
        prefix = next((name + "." for name, module in outer.named_modules() if module is saved and name), "")
        return {key[len(prefix):] if key.startswith(prefix) else key: value for key, value in full.items()}

    def _print_summary(self, wall: float, eval_record: Optional[Dict[str, float]], final_dir: Path) -> None:
        if not self.accelerator.is_main_process:
            return
        tcfg, progress = self.tcfg, self.progress
        global_batch = tcfg.per_device_batch_size * tcfg.gradient_accumulation_steps * self.accelerator.num_processes
        rows = [
            ("algorithm", self.title),
            ("steps", str(progress.step)),
            ("global batch", f"{global_batch} ({self.accelerator.num_processes} process(es))"),
            ("tokens", f"{progress.tokens_total:,}"),
            ("wall time", f"{wall:.1f} s"),
            ("tokens/s", f"{(progress.tokens_total - self.tokens_before) / max(wall, 1e-9):,.1f}"),
            ("final train loss", f"{self.last_loss:.4f}"),
            ("padding", f"{self.last_padding:.0%} of batch positions (last logging window)"),
        ]
        if eval_record:
            rows.append(("final eval loss", f"{eval_record['loss']:.4f}"))
        if progress.skipped_nonfinite:
            rows.append(("skipped batches", f"{progress.skipped_nonfinite} (non-finite loss)"))
        rows += self.data.notes
        rows += [("run directory", str(self.run_dir)), ("model saved to", str(final_dir))]
        print_summary("alignctl run summary", rows)


def _fresh_accelerator_state() -> None:
    """accelerate keeps one process-wide state; a second run in the same process (tests, notebooks)
    may ask for another precision. Outside a multi-process launch, start from a clean state."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    if PartialState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
