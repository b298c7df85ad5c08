"""The online loop: rollout -> score -> advantages -> update epochs, one step per rollout batch.

Built on the run shell (``engine.run``). Each step takes the next batch of prompts (or other
conditioning: nothing here reads tokens) from a resumable, seeded sampler, and hands it to the
algorithm, which samples, scores and updates, returning the step's loss, metrics and how many
units (generated tokens, images, ...) it produced. The algorithm plugs in through
``OnlineAlgorithm``; its math stays in pure functions (``losses/``, ``rl/``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Protocol, Tuple

import torch
from omegaconf import DictConfig

from alignctl.engine.offline import EpochSampler
from alignctl.engine.optim import build_optimizer, build_scheduler, plan_steps
from alignctl.engine.run import RunResult, RunShell
from alignctl.engine.window import Metrics


@dataclass
class OnlineData:
    """What the sampler draws from: prompts (or any conditioning), batched by ``collate``."""

    train: List
    collate: Callable[[List], Dict[str, Any]]
    notes: List[Tuple[str, str]] = field(default_factory=list)
    # Saved beside the model (tokenizer, scheduler config, ...).
    processors: List[Any] = field(default_factory=list)


class OnlineAlgorithm(Protocol):
    unit: str  # what the throughput counts: "tokens" (generated), "images", ...

    def rollout_batch_size(self, job: DictConfig) -> int: ...

    def accumulation_steps(self, job: DictConfig) -> int: ...

    def prepare_data(self, job: DictConfig) -> OnlineData: ...

    def build_model(self, job: DictConfig) -> torch.nn.Module: ...

    def setup(self, job: DictConfig, loop: "OnlineLoop") -> None:
        """After accelerator.prepare: reference model, reward sources, update machinery."""

    def iteration(self, batch: Dict[str, Any], loop: "OnlineLoop") -> Tuple[torch.Tensor, Metrics, torch.Tensor]:
        """One step: sample, score, update. Returns (loss, metrics, units produced)."""

    def unwrap_for_save(self, model: torch.nn.Module) -> torch.nn.Module: ...


def run_online(job: DictConfig, algorithm: OnlineAlgorithm, title: str) -> RunResult:
    return OnlineLoop(job, algorithm, title).run()


class OnlineLoop(RunShell):
    def __init__(self, job: DictConfig, algorithm: OnlineAlgorithm, title: str) -> None:
        super().__init__(job, algorithm, title)
        self.unit = algorithm.unit

    def accumulation_steps(self) -> int:
        return self.algorithm.accumulation_steps(self.job)

    def build(self) -> None:
        job, tcfg, accelerator = self.job, self.tcfg, self.accelerator
        self.data = self.algorithm.prepare_data(job)
        self.processors = self.data.processors
        self.data.notes.extend(self.notes)
        self.notes = self.data.notes
        model = self.algorithm.build_model(job)
        loader = torch.utils.data.DataLoader(
            self.data.train,
            batch_size=self.algorithm.rollout_batch_size(job),
            sampler=EpochSampler(len(self.data.train), tcfg.seed),
            collate_fn=self.data.collate,
        )
        optimizer = build_optimizer(model, tcfg)
        self.model, self.optimizer, self.loader = accelerator.prepare(model, optimizer, loader)
        # One step is one rollout batch (gradient accumulation happens inside the step).
        self.total_steps = plan_steps(_one_batch_per_step(tcfg), len(self.loader))
        self.scheduler = build_scheduler(self.optimizer, tcfg, self.total_steps)
        self.algorithm.setup(job, self)

    def train(self) -> None:
        self.model.train()
        for batch in self.batches(self.loader):
            self._seed_step()
            loss, metrics, units = self.algorithm.iteration(batch, self)
            self.window.add(loss.detach(), metrics, units)
            self.end_step()

    def _seed_step(self) -> None:
        """Seed the global RNG (sampling, mini-batch shuffles) from (seed, step, process): a step
        draws the same numbers whether the run was resumed or not, whatever else used the RNG."""
        step_seed = (self.tcfg.seed * 1_000_003 + self.progress.step) * 1_009 + self.accelerator.process_index
        torch.manual_seed(step_seed % (2**63 - 1))

    def log_extras(self) -> Dict[str, float]:
        progress = self.progress
        return {"epoch": progress.epoch + progress.batch_in_epoch / max(1, len(self.loader))}

    def summary_rows(self) -> List[Tuple[str, str]]:
        processes = self.accelerator.num_processes
        per_step = self.algorithm.rollout_batch_size(self.job) * processes
        return [("rollout batch", f"{per_step} prompts per step ({processes} process(es))")]

    def late_summary_rows(self) -> List[Tuple[str, str]]:
        record = getattr(self, "last_record", {})
        rows = []
        if "env/reward_mean" in record:
            rows.append(("final reward mean", f"{record['env/reward_mean']:.4f} (last logging window)"))
        return rows


class _one_batch_per_step:
    """The train config seen by plan_steps: one rollout batch per step."""

    def __init__(self, tcfg) -> None:
        self.max_steps, self.num_epochs, self.gradient_accumulation_steps = tcfg.max_steps, tcfg.num_epochs, 1
