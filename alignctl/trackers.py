"""Experiment trackers (``run.report_to``): TensorBoard, Weights & Biases, MLflow, through
accelerate's tracker classes.

Everything a tracker writes stays in the run directory where the tracker allows it: TensorBoard
event files in ``RUN_DIR/tensorboard``, wandb's local files in ``RUN_DIR/wandb`` (``WANDB_MODE=offline``
keeps it off the network), MLflow's file store in ``RUN_DIR/mlruns`` unless ``MLFLOW_TRACKING_URI``
names another store. A requested tracker whose package is missing is one ConfigError before
anything is written (``check_report_to``, run by config validation).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Dict, List

from alignctl.errors import AlignctlError, ConfigError

# name -> the package it needs (and the pip extra that installs it)
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def requested_trackers(run_cfg: Any) -> List[str]:
    """``run.report_to`` in order, plus ``tensorboard`` when the older ``run.tensorboard=true`` is set."""
    names = [str(name) for name in (run_cfg.report_to or [])]
    if run_cfg.tensorboard and "tensorboard" not in names:
        names.append("tensorboard")
    return names


def check_report_to(job: Any) -> None:
    """Known names, no repeats, and every package importable."""
    value = job.run.report_to
    if isinstance(value, str) or not all(isinstance(name, str) for name in value or []):
        raise ConfigError(f"run.report_to={value}: must be a list, e.g. run.report_to=[tensorboard,wandb]")
    names = list(value or [])
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"run.report_to: unknown tracker {name!r}; use any of {', '.join(TRACKERS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"run.report_to={names}: names a tracker twice")
    for name in requested_trackers(job.run):
        package = TRACKERS[name]
        if importlib.util.find_spec(package) is None:
            extra = f'pip install "alignctl[{name}]"' if name != "tensorboard" else "pip install tensorboard"
            raise ConfigError(
                f"run.report_to includes {name}, but the {package} package is not installed; {extra}, "
                f"or drop {name} from run.report_to"
            )


def open_trackers(names: List[str], run_dir: Path, run_name: str, config: Dict[str, Any]) -> List[Any]:
    """Started accelerate trackers for ``names`` (main process only), the run's config stored in
    those that keep hyper-parameters (TensorBoard's copy is config.yaml beside it)."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    trackers = []
    for name in names:
        if name == "tensorboard":
            tracker = TensorBoardTracker("tensorboard", run_dir)
        elif name == "wandb":
            os.environ.setdefault("WANDB_DIR", str(run_dir))
            tracker = WandBTracker("alignctl", name=run_name, dir=str(run_dir))
        else:
            if not os.environ.get("MLFLOW_TRACKING_URI"):
                import mlflow

                # MLflow 3 keeps its file store only on request; it needs no database server
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
            tracker = MLflowTracker(experiment_name="alignctl", run_name=run_name)
        try:
            if hasattr(tracker, "start"):  # accelerate >= 1.6 starts trackers lazily
                tracker.start()
            if name != "tensorboard":
                tracker.store_init_configuration(config)
        except Exception as exc:  # the tracker's own failure (login, server, store): one clear line
            for started in trackers:
                started.finish()
            reason = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise AlignctlError(f"run.report_to: {name} could not start ({reason}); fix that or drop {name} "
                                "from run.report_to") from None
        trackers.append(tracker)
    return trackers


def flat_config(config: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}``; lists become strings."""
    flat: Dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, name + "."))
        elif isinstance(value, (list, tuple)):
            flat[name] = str(list(value))
        else:
            flat[name] = value
    return flat
