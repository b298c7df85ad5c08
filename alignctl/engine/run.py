"""The run shell: what every training run does, whatever its loop.

A run directory and its config dump, the accelerator and seeds, resume from a checkpoint, stop
signals, the non-finite guard, atomic checkpoints, tracking, the final save and the summary. The
loops built on it (``engine.offline``: epochs over a data set; ``engine.online``: rollout, score,
update) fill in ``build`` (data, model, optimizer, step count) and ``train`` (the steps), and call
``end_step`` after every step. Nothing here assumes a tokenizer or counts only tokens: a loop names
its throughput unit (tokens, samples, images) and the objects saved beside the model
(``processors``: a tokenizer, a scheduler config, ...).
"""

from __future__ import annotations

import itertools
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from omegaconf import DictConfig

from alignctl.checkpoint import UnreadableCheckpoint, checkpoint_path, list_checkpoints, save_checkpoint, write_atomically
from alignctl.engine.clock import RunClock, rate
from alignctl.engine.guards import NonFiniteLoss, RunInterrupted, StopSignals, UniformLossWatch, nonfinite_message
from alignctl.engine.heap import bound_onednn_cache
from alignctl.engine.optim import check_precision
from alignctl.engine.state import TrainProgress, read_training_state, restore_rng, write_training_state
from alignctl.engine.window import MetricWindow
from alignctl.errors import ConfigError
from alignctl.run_dir import FINAL_MODEL, check_steps_left, plan_run, run_identity, start_run_dir, write_config
from alignctl.tracking import RunTracker, print_summary, write_summary


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    final_loss: float
    units: int  # trained by this process, in the loop's unit (a resumed run counts from where it resumed)
    wall_s: float  # seconds of training steps (no set-up, evaluation or saving): units / wall_s is the throughput
    unit: str = "tokens"

    @property
    def tokens(self) -> int:
        return self.units


class RunShell:
    """Base of the loops. Subclasses set ``unit`` and implement ``build``, ``train``,
    ``accumulation_steps`` and ``summary_rows``; they may override ``evaluate``."""

    unit = "tokens"

    def __init__(self, job: DictConfig, algorithm: Any, title: str) -> None:
        self.job, self.algorithm, self.title = job, algorithm, title
        self.tcfg = job.train
        self.notes: List[Tuple[str, str]] = []  # extra summary rows (data, skipped rows, resume)
        self.processors: List[Any] = []  # saved beside the model (tokenizer, ...)
        self.last_loss = float("nan")
        self.skipped_in_a_row = 0  # non-finite batches skipped since the last completed step
        # Loss of uniform predictions (ln vocab) for token-level losses; a loop sets it to be warned
        # when the logged loss sits there (a collapsed model).
        self.uniform_loss: Optional[float] = None

    # ------------------------------------------------------------------ hooks for the loops
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step (accelerate's gradient accumulation)."""
        raise NotImplementedError

    def build(self) -> None:
        """Data, model (``self.model``, prepared), ``self.optimizer``, ``self.scheduler``, ``self.total_steps``."""
        raise NotImplementedError

    def train(self) -> None:
        """Run steps until ``self.progress.step == self.total_steps``, calling ``end_step`` after each."""
        raise NotImplementedError

    def evaluate(self) -> Optional[Dict[str, float]]:
        """Metrics on held-out data, or None when the run has none."""
        return None

    def summary_rows(self) -> List[Tuple[str, str]]:
        """Loop-specific rows of the final summary (global batch, padding, ...)."""
        return []

    def log_extras(self) -> Dict[str, float]:
        """Values added to every logged train record (epoch, ...)."""
        return {}

    # ------------------------------------------------------------------ the run
    def run(self) -> RunResult:
        """Plan (read-only checks), set up (accelerator, data, model, resume), and only then write
        into the run directory: a run that fails before training leaves the folder as it was."""
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        job = self.job
        self.clock = RunClock("setup")
        self.said: List[str] = []  # set-up messages, copied into console.log once it exists
        mixed_precision = check_precision(job.precision.name)
        plan = plan_run(job)
        self.run_dir, self.run_id = plan.run_dir, plan.run_id
        fresh_accelerator_state()
        self.accelerator = accelerator = Accelerator(
            mixed_precision=mixed_precision, gradient_accumulation_steps=self.accumulation_steps()
        )
        set_seed(self.tcfg.seed)
        if accelerator.device.type == "cpu":  # before any matmul creates oneDNN primitives
            self.notes.append(bound_onednn_cache())
        self._check_sharded_options()
        self._say(*plan.skipped)
        self.progress = TrainProgress()
        self.window = MetricWindow(self.unit, timer=lambda: self.clock.seconds("train"))
        self.build()
        resumed = self._restore(plan.candidates) if plan.candidates else None
        if resumed is not None:
            check_steps_left(job, resumed, self.progress.step, self.total_steps)
        if accelerator.is_main_process:
            self._say(*start_run_dir(job, plan, self.progress.step if resumed is not None else None))
        accelerator.wait_for_everyone()
        return self._train_and_finish()

    def _say(self, *lines: str) -> None:
        from alignctl.tracking import console

        if self.accelerator.is_main_process:
            for line in lines:
                console.print(f"[yellow]{line}[/]", highlight=False, soft_wrap=True)
                self.said.append(line)

    def _restore(self, candidates: List[Path]) -> Path:
        """Resume from the first checkpoint that loads (resume=auto offers older ones as fallbacks)."""
        model = self.accelerator.unwrap_model(self.model)
        for i, folder in enumerate(candidates):
            try:
                resumed = read_training_state(folder, model)
                if hasattr(self.algorithm, "load_extras"):  # state saved beside the model (save_extras)
                    self.algorithm.load_extras(folder / "model")
                break
            except UnreadableCheckpoint as exc:
                if i == len(candidates) - 1:
                    raise UnreadableCheckpoint(
                        f"checkpoint {folder} cannot be resumed from: {exc}; name an older one with resume=PATH, "
                        "or start without resume"
                    ) from None
                self._say(f"skipped checkpoint {folder}: {exc}")
        self.optimizer.load_state_dict(resumed["optimizer"])
        self.scheduler.load_state_dict(resumed["scheduler"])
        self.window.load_state_dict(resumed["window"], self.accelerator.device)
        self.progress = resumed["progress"]
        if hasattr(self.algorithm, "load_state_dict"):
            self.algorithm.load_state_dict(resumed["algorithm"])
        restore_rng(resumed["rng"])
        self.notes.append(("resumed from", f"{folder} (step {self.progress.step})"))
        return folder

    def _train_and_finish(self) -> RunResult:
        from omegaconf import OmegaConf

        from alignctl.trackers import requested_trackers

        job, accelerator, progress = self.job, self.accelerator, self.progress
        self.tracker = RunTracker(
            self.run_dir, self.total_steps, enabled=accelerator.is_main_process,
            progress=job.run.progress, report_to=requested_trackers(job.run), unit=self.unit,
            run_name=self.run_dir.name, config=OmegaConf.to_container(job, resolve=True),
        )
        self.units_before = progress.units_total  # > 0 when resumed: not part of this process's speed
        self.steps_before = progress.step
        self.uniform_watch = UniformLossWatch(self.uniform_loss)
        self.throughput: Optional[Tuple[int, float]] = None  # (units, training seconds) of the last figure shown
        self._shown_at = 0.0
        plotted = False
        try:
            with self.tracker:
                for line in self.said:
                    self.tracker.note(line)
                with StopSignals() as self.stop:
                    self.clock.switch("train")
                    self.window.started = self.window.timer()  # set-up time is not throughput
                    self._train_started = time.perf_counter()
                    if progress.step:  # resumed: start the bar where the run stopped
                        self.tracker.advance(progress.step, None, self.scheduler.get_last_lr()[0], 0.0, logged=False)
                    self.train()
                    self.clock.switch("finish")  # whatever follows the last step is not training
                    eval_record = self.run_evaluation()
                with self.clock.phase("save"):
                    final_dir = self._save_final()
                self.tracker.stop_bar()
                plots, plotted = self._write_plots(), True
                self._print_summary(eval_record, final_dir, plots)
        finally:
            if not plotted:  # a run stopped by an error or a signal: plots of what it logged
                self._write_plots()
        units, seconds = self._throughput()
        return RunResult(self.run_dir, progress.step, self.last_loss, units, seconds, self.unit)

    def run_evaluation(self) -> Optional[Dict[str, float]]:
        """Evaluate (and show sample generations) at the current step, timed as evaluation."""
        with self.clock.phase("eval"):
            record = self.evaluate()
            if record:
                self.tracker.log(self.progress.step, record, split="eval")
            self.show_samples()
        return record

    def show_samples(self) -> None:
        """Generations of the policy at an evaluation (offline policy algorithms); nothing by default."""

    def _throughput(self) -> Tuple[int, float]:
        """(units trained by this session, seconds of training steps): the figure the last
        progress line showed, which the summary repeats."""
        if self.throughput is not None and self.progress.step == self.total_steps:
            return self.throughput
        return self.progress.units_total - self.units_before, self.clock.seconds("train")

    def _show_progress(self, step: int, lr: float, loss: Optional[float]) -> None:
        """Progress after every step: the bar's count always; its figures at logging steps (``loss``
        given) and otherwise at most twice a second (reading the running loss is a device sync)."""
        tracker = self.tracker
        if not tracker.enabled:
            return
        logged = loss is not None
        now = time.perf_counter()
        if not logged and (not tracker.bar or now - self._shown_at < 0.5):
            tracker.advance(step, None, lr, 0.0, logged=False)
            return
        self._shown_at = now
        if loss is None:
            loss = self.window.running_mean("loss")
        # units not yet reduced across processes: this process's share times the process count
        pending = int(self.window.units) * self.accelerator.num_processes
        units = self.progress.units_total - self.units_before + pending
        if step == self.total_steps:  # training ends with the last step's figures: the summary repeats them
            self.clock.switch("finish")
        seconds = self.clock.seconds("train")
        if logged:
            self.throughput = (units, seconds)
        done = step - self.steps_before
        eta = (now - self._train_started) / done * (self.total_steps - step) if done > 0 else None
        tracker.advance(step, loss, lr, rate(units, seconds), eta, logged=logged)

    def _write_plots(self) -> List[Path]:
        """PNGs of the logged metrics into RUN_DIR/plots; a failure is a warning, never an error."""
        if not self.accelerator.is_main_process:
            return []
        try:
            from alignctl.plots import write_run_plots

            return write_run_plots(self.run_dir)
        except Exception as exc:  # plotting must never fail a run that trained
            reason = " ".join(str(exc).split())[:300] or type(exc).__name__
            self.tracker.warn(f"plots were not written ({reason}); run `alignctl plot {self.run_dir}` to retry")
            return []

    def batches(self, loader) -> Iterator[Any]:
        """The loader's batches from where ``progress`` stands, epoch after epoch, until the last
        step. Each epoch's shuffle is seeded by (seed, epoch) and a resumed run skips the batches its
        epoch already used, so it continues the same order."""
        progress = self.progress
        while progress.step < self.total_steps:
            # accelerate's loader passes its epoch on to our sampler at each pass
            loader.set_epoch(progress.epoch)
            for batch in itertools.islice(iter(loader), progress.batch_in_epoch, None):
                progress.batch_in_epoch += 1
                yield batch
                if progress.step >= self.total_steps:
                    return
            progress.epoch += 1
            progress.batch_in_epoch = 0

    def end_step(self) -> None:
        """After each optimizer step (offline) or rollout iteration (online): schedule, log,
        evaluate, checkpoint, and stop cleanly when a signal asked for it."""
        tcfg, progress = self.tcfg, self.progress
        lr = self.scheduler.get_last_lr()[0]
        with warnings.catch_warnings():
            # A step whose updates were all skipped (non-finite losses, no kept completion) still
            # advances the schedule, on purpose: torch warns about that order.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            self.scheduler.step()
        progress.step += 1
        self.skipped_in_a_row = 0
        step = progress.step
        if step == 1 or step % tcfg.logging_steps == 0 or step == self.total_steps:
            record, units = self.window.flush(self.accelerator)
            progress.units_total += units
            self.last_loss = record["loss"]
            self.last_record = record
            record.update(lr=lr, **self.log_extras())
            if progress.skipped_nonfinite:
                record["skipped_nonfinite"] = progress.skipped_nonfinite
            self.tracker.log(step, record)
            self._show_progress(step, lr, record["loss"])
            warning = self.uniform_watch.see(record["loss"])
            if warning:
                self.tracker.print(f"[yellow]warning:[/] {warning}")
        else:
            self._show_progress(step, lr, None)
        if tcfg.eval_steps > 0 and step % tcfg.eval_steps == 0 and step < self.total_steps:
            self.run_evaluation()
        if tcfg.save_steps > 0 and step % tcfg.save_steps == 0 and step < self.total_steps:
            self.save_checkpoint()
        # After the last step the run just finishes (its final save is the checkpoint that matters).
        if step < self.total_steps and self.stop.any_process(self.accelerator):
            path = self.save_checkpoint()
            raise RunInterrupted(
                f"stopped by {self.stop.signal_name or 'a signal'} after step {step}; checkpoint {path}; "
                f"continue with the same command plus resume=auto run.output_dir={self.run_dir}"
            )

    def handle_nonfinite(self, loss: torch.Tensor, rows: List[int]) -> None:
        """Stop naming the step and rows, or (train.skip_nonfinite) count the skipped batch; stop
        anyway after train.max_consecutive_nonfinite skips in a row, or when a signal asks."""
        if not self.tcfg.skip_nonfinite:
            raise NonFiniteLoss(nonfinite_message(loss, self.progress.step, rows, self._last_checkpoint()))
        self.progress.skipped_nonfinite += 1
        self.skipped_in_a_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        step, limit = self.progress.step + 1, self.tcfg.max_consecutive_nonfinite
        if self.accelerator.is_main_process:
            self.tracker.print(f"[yellow]skipped a batch with a non-finite loss at step {step}[/]")
        where = self._last_checkpoint() or "none yet"
        if self.skipped_in_a_row >= limit:
            raise NonFiniteLoss(
                f"{self.skipped_in_a_row} batches in a row had a non-finite loss at step {step} "
                f"(train.max_consecutive_nonfinite={limit}): the model has diverged; last good checkpoint: {where}. "
                "Lower train.lr or check the data, then resume=auto (or start over with run.overwrite=true)"
            )
        if self.stop.any_process(self.accelerator):  # the step is incomplete: nothing new to save
            raise RunInterrupted(
                f"stopped by {self.stop.signal_name or 'a signal'} while skipping non-finite batches at step {step}; "
                f"last checkpoint: {where}; continue with the same command plus resume=auto run.output_dir={self.run_dir}"
            )

    def _last_checkpoint(self) -> Optional[str]:
        found = list_checkpoints(self.run_dir)
        return str(found[-1]) if found else None

    # ------------------------------------------------------------------ saving
    def save_checkpoint(self) -> Path:
        with self.clock.phase("save"):
            return self._save_checkpoint()

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
                self._write_model(model, folder / "model", merge=False, gathered=gathered, final_folder=path / "model")
                if gathered is None:  # sharded runs keep the weights only (see read_training_state)
                    state.update(
                        write_training_state(
                            folder, model, self.optimizer, self.scheduler, self.window.state_dict(), progress, algorithm_state
                        )
                    )

            state.update(run_id=self.run_id, identity=run_identity(self.job))  # what resume checks
            save_checkpoint(self.run_dir, progress.step, write, state, keep=self.tcfg.save_total_limit)
        accelerator.wait_for_everyone()
        return path

    def _save_final(self) -> Path:
        final_dir = self.run_dir / FINAL_MODEL
        gathered = self._gathered_weights()
        if self.accelerator.is_main_process:
            model = self.accelerator.unwrap_model(self.model)
            merge = bool(self.job.peft.merge_on_save) and self.job.peft.method != "none"

            def write_final(folder: Path) -> None:
                self._write_model(model, folder, merge=merge, gathered=gathered, final_folder=final_dir)
                write_config(self.job, folder)

            write_atomically(final_dir, write_final)
        self.accelerator.wait_for_everyone()
        return final_dir

    def _write_model(self, model: torch.nn.Module, folder: Path, merge: bool, gathered, final_folder: Path) -> None:
        """``folder``: the temporary folder of an atomic save, renamed to ``final_folder`` when complete
        (a LoRA adapter records its base by absolute path, so it needs the final place)."""
        from alignctl.models.policy import save_model

        save_model(self.algorithm.unwrap_for_save(model), folder, processors=self.processors,
                   merge_adapter=merge, state_dict=gathered, model_cfg=self.job.model, final_folder=final_folder)
        if hasattr(self.algorithm, "save_extras"):  # e.g. PPO's value head
            self.algorithm.save_extras(model, folder)

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

    def _print_summary(self, eval_record: Optional[Dict[str, float]], final_dir: Path, plots: List[Path]) -> None:
        """The summary table (console and console.log) and summary.json."""
        if not self.accelerator.is_main_process:
            return
        progress, unit = self.progress, self.unit
        units, seconds = self._throughput()
        phases = self.clock.breakdown()
        wall = self.clock.total()
        rows = [
            ("algorithm", self.title),
            ("steps", str(progress.step)),
            *self.summary_rows(),
            (unit, f"{progress.units_total:,}"),
            ("wall time", f"{wall:.1f} s (set-up {phases['setup']:.1f}, training {phases['train']:.1f}, "
                          f"evaluation {phases['eval']:.1f}, saving {phases['save']:.1f}, "
                          f"plots and summary {phases['finish']:.1f})"),
            (f"{unit}/s", f"{rate(units, seconds):,.1f} (over the training steps' time)"),
            ("final train loss", f"{self.last_loss:.4f}"),
        ]
        rows += self.late_summary_rows()
        if eval_record:
            rows.append(("final eval loss", f"{eval_record['loss']:.4f}"))
        if progress.skipped_nonfinite:
            rows.append(("skipped batches", f"{progress.skipped_nonfinite} (non-finite loss)"))
        rows += self.notes
        precision = self.job.precision
        rows.append(("precision", precision.name + (f" ({precision.auto_reason})" if precision.get("auto_reason") else "")))
        rows += [("run directory", str(self.run_dir)), ("model saved to", str(final_dir))]
        if plots:
            rows.append(("plots", str(plots[0].parent)))
        print_summary("alignctl run summary", rows, self.tracker)
        write_summary(self.run_dir, rows, {
            "algorithm": self.title, "steps": progress.step, "unit": unit, "units": progress.units_total,
            "units_per_s": rate(units, seconds), "wall_s": wall, "phase_s": phases,
            "final_train_loss": self.last_loss, "final_eval": eval_record or None,
            **self.summary_values(), "run_dir": str(self.run_dir), "final_model": str(final_dir),
        })

    def summary_values(self) -> Dict[str, Any]:
        """Loop-specific figures of summary.json (train and eval example counts, ...)."""
        return {}

    def late_summary_rows(self) -> List[Tuple[str, str]]:
        """Rows shown after the final loss (padding share, final reward, ...)."""
        return []


def fresh_accelerator_state() -> None:
    """accelerate keeps one process-wide state; a second run in the same process (tests, notebooks)
    may ask for another precision. Outside a multi-process launch, start from a clean state."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    if PartialState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
