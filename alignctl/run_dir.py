"""The run directory: where a run's config, metrics, checkpoints and final model live."""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from alignctl.errors import ConfigError

CONFIG_FILE = "config.yaml"
FINAL_MODEL = "final_model"


def resolve_run_dir(job: DictConfig, resuming: bool = False) -> Path:
    """``run.output_dir``, or runs/<algo>-<timestamp>; refuses a finished run unless run.overwrite."""
    if job.run.output_dir:
        run_dir = Path(job.run.output_dir).expanduser()
    elif resuming:
        raise ConfigError("resume needs the run to continue: set run.output_dir to its run directory")
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / f"{job.algo.name}-{stamp}"
    if resuming and (run_dir / FINAL_MODEL).exists():
        raise ConfigError(f"run.output_dir={run_dir} already finished (final_model exists); nothing to resume")
    if (run_dir / FINAL_MODEL).exists() and not job.run.overwrite:
        raise ConfigError(
            f"run.output_dir={run_dir} already holds a finished run; choose another directory or set "
            "run.overwrite=true to replace it"
        )
    return run_dir


def write_config(job: DictConfig, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(OmegaConf.to_yaml(job, resolve=True), encoding="utf-8")
