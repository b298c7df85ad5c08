"""The run directory: where a run's config, metrics, checkpoints and final model live.

Nothing here writes before ``start_run_dir``, which the run shell calls only once set-up (data,
model, resume) has succeeded, so a run that fails early never costs the previous run anything:

- ``resolve_run_dir`` picks the folder and refuses one alignctl must not write into (a file, an
  unwritable place, a folder of someone else's files, a finished run, a run with checkpoints
  started again without ``resume``);
- ``plan_run`` adds the checkpoint(s) a resume would use, each checked for completeness, for
  belonging to this run (run ids) and for being made with the same algorithm and model;
- ``start_run_dir`` clears the previous run's outputs (fresh start) or drops the metrics logged
  after the checkpoint (resume), then writes run.json and config.yaml.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from alignctl.checkpoint import CHECKPOINT_DIR, checkpoint_problem, read_state, remove_leftovers, step_folders
from alignctl.errors import ConfigError

CONFIG_FILE = "config.yaml"
FINAL_MODEL = "final_model"
RUN_FILE = "run.json"  # marks a folder as an alignctl run directory and holds the run id
# What a run writes and a fresh start in the same folder removes (config.yaml and run.json are
# rewritten; accelerate_config.yaml belongs to the launch that may be starting this very run;
# eval/ holds `alignctl eval` results of the finished model).
RUN_OUTPUTS = ("metrics.jsonl", "samples.jsonl", "tensorboard", CHECKPOINT_DIR, FINAL_MODEL, "eval",
               "console.log", "summary.json", "plots", "wandb", "mlruns")
# Settings a checkpoint must share with the run that resumes it.
IDENTITY_KEYS = ("algo.name", "model.name_or_path", "model.gguf_file", "peft.method")


# ---------------------------------------------------------------------------------- which folder
def resolve_run_dir(job: DictConfig, resuming: bool = False) -> Path:
    """``run.output_dir``, or runs/<algo>-<timestamp>; refuses a folder this run must not use."""
    if job.run.output_dir:
        run_dir = Path(job.run.output_dir).expanduser()
    elif resuming:
        raise ConfigError("resume needs the run to continue: set run.output_dir to its run directory")
    else:
        run_dir = _default_run_dir(job.algo.name)
    check_usable(run_dir)
    if resuming and (run_dir / FINAL_MODEL).exists():
        raise ConfigError(f"run.output_dir={run_dir} already finished (final_model exists); nothing to resume")
    if not resuming and not job.run.overwrite:
        _refuse_earlier_run(run_dir)
    return run_dir


def _default_run_dir(algo: str) -> Path:
    base = Path("runs") / f"{algo}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir, n = base, 1
    while run_dir.exists():  # two runs started in the same second
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    return run_dir


def _refuse_earlier_run(run_dir: Path) -> None:
    if (run_dir / FINAL_MODEL).exists():
        raise ConfigError(
            f"run.output_dir={run_dir} already holds a finished run; choose another directory or set "
            "run.overwrite=true to replace it"
        )
    found = step_folders(run_dir)
    if found:
        raise ConfigError(
            f"run.output_dir={run_dir} holds checkpoints of an earlier run (newest: {found[0].name}); continue it "
            "with resume=auto, start over with run.overwrite=true (its checkpoints and metrics are deleted), or "
            "choose another run.output_dir"
        )


def check_usable(run_dir: Path) -> None:
    """A directory (or a place one can be made) that alignctl may write, holding nothing but a run."""
    for place in (run_dir, *run_dir.parents):
        if place.exists():
            break
    if not place.is_dir():
        what = "is a file" if place == run_dir else f"cannot be created: {place} is a file"
        raise ConfigError(f"run.output_dir={run_dir} {what}, not a directory; set run.output_dir to a directory")
    if place == run_dir and any(run_dir.iterdir()) and not is_run_dir(run_dir):
        shown = ", ".join(sorted(p.name for p in run_dir.iterdir())[:5])
        raise ConfigError(
            f"run.output_dir={run_dir} is not empty and is not an alignctl run directory (it holds {shown}); "
            "alignctl does not write among other files: choose a new or empty directory"
        )
    try:  # the only reliable test of writability (permissions, read-only mounts, quotas)
        handle, probe = tempfile.mkstemp(prefix=".alignctl-write-test-", dir=place)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(
            f"run.output_dir={run_dir} is not writable ({exc.strerror} in {place}); choose a directory you can write to"
        ) from None


def is_run_dir(path: Path) -> bool:
    """Written by alignctl: run.json (or, from older versions, checkpoints/ or final_model/)."""
    return any((path / name).exists() for name in (RUN_FILE, CHECKPOINT_DIR, FINAL_MODEL))


# ---------------------------------------------------------------------------------- resume plan
@dataclass
class RunPlan:
    run_dir: Path
    run_id: str
    # Checkpoints to resume from, best first (resume=auto may fall back to later ones); empty: fresh start.
    candidates: List[Path] = field(default_factory=list)
    # Checkpoints passed over and why, for the console.
    skipped: List[str] = field(default_factory=list)


def plan_run(job: DictConfig) -> RunPlan:
    """Where the run goes and what it resumes; reads the folder, writes nothing."""
    run_dir = resolve_run_dir(job, resuming=bool(job.resume))
    if not job.resume:
        return RunPlan(run_dir, new_run_id())
    dir_id = read_run_id(run_dir)
    if job.resume == "auto":
        candidates, skipped = _auto_candidates(run_dir, dir_id)
    else:
        candidates, skipped = [_explicit_checkpoint(job.resume, run_dir, dir_id)], []
    state = read_state(candidates[0])
    check_same_settings(job, candidates[0], state)
    check_steps_left(job, candidates[0], state["step"])
    return RunPlan(run_dir, state.get("run_id") or dir_id or new_run_id(), candidates, skipped)


def _auto_candidates(run_dir: Path, dir_id: Optional[str]):
    candidates, skipped = [], []
    for folder in step_folders(run_dir):
        problem = checkpoint_problem(folder) or _other_run(read_state(folder).get("run_id"), dir_id)
        if problem:
            skipped.append(f"skipped checkpoint {folder}: {problem}")
        else:
            candidates.append(folder)
    if not candidates:
        why = f" ({'; '.join(skipped)})" if skipped else ""
        raise ConfigError(
            f"resume=auto: no usable checkpoint in {run_dir / CHECKPOINT_DIR}{why}; set run.output_dir to the run "
            "to continue, or start it without resume"
        )
    return candidates, skipped


def _other_run(checkpoint_id: Optional[str], dir_id: Optional[str]) -> Optional[str]:
    if checkpoint_id and dir_id and checkpoint_id != dir_id:
        return f"made by another run (run id {checkpoint_id}; this run directory's run id is {dir_id})"
    return None


def _explicit_checkpoint(resume: str, run_dir: Path, dir_id: Optional[str]) -> Path:
    folder = Path(resume).expanduser()
    problem = checkpoint_problem(folder) if folder.is_dir() else "no such folder"
    if problem:
        raise ConfigError(f"resume={resume}: cannot resume from it: {problem}")
    other = _other_run(read_state(folder).get("run_id"), dir_id)
    if other:
        raise ConfigError(
            f"resume={resume}: the checkpoint was {other}; run.output_dir={run_dir} holds another run: continue "
            "that one with resume=auto, or set run.output_dir to a new directory to branch off from the checkpoint"
        )
    return folder


def run_identity(job: DictConfig) -> Dict[str, Any]:
    return {key: OmegaConf.select(job, key) for key in IDENTITY_KEYS}


def check_same_settings(job: DictConfig, folder: Path, state: Dict[str, Any]) -> None:
    """Refuse to resume a checkpoint made by another algorithm, model or peft method."""
    saved = state.get("identity") or _identity_from_config(folder.parent.parent / CONFIG_FILE)
    now = run_identity(job)
    differ = [f"{key}={saved[key]} in the checkpoint, {key}={now[key]} now" for key in IDENTITY_KEYS
              if key in saved and saved[key] != now[key]]
    if differ:
        raise ConfigError(
            f"resume: checkpoint {folder} was made with other settings ({'; '.join(differ)}); resume with the "
            f"original settings, or start a new run from its weights with model.name_or_path={folder / 'model'} "
            "and no resume"
        )


def _identity_from_config(path: Path) -> Dict[str, Any]:
    """Checkpoints of older versions carry no identity: read it from the run's config.yaml."""
    try:
        saved = OmegaConf.load(path)
        values = {key: OmegaConf.select(saved, key, default=None) for key in IDENTITY_KEYS}
    except Exception:  # missing or unreadable: nothing to compare
        return {}
    return {key: value for key, value in values.items() if value is not None}


def check_steps_left(job: DictConfig, folder: Path, step: int, total_steps: Optional[int] = None) -> None:
    total = total_steps if total_steps is not None else job.train.max_steps
    if total > 0 and step >= total:
        how = f"train.max_steps={job.train.max_steps}" if job.train.max_steps > 0 else (
            f"train.num_epochs={job.train.num_epochs} makes {total} steps")
        raise ConfigError(
            f"nothing left to train: the checkpoint {folder} is at step {step}, {how}; raise train.max_steps "
            "to train further"
        )


# ---------------------------------------------------------------------------------- run ids
def new_run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"


def read_run_id(run_dir: Path) -> Optional[str]:
    try:
        return json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def write_run_file(run_dir: Path, run_id: Optional[str], algo: str) -> None:
    tmp = run_dir / f".{RUN_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"run_id": run_id, "algo": algo, "written_by": "alignctl"}, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, run_dir / RUN_FILE)


def mark_run_dir(run_dir: Path, algo: str) -> None:
    """Claim a new folder as a run directory (a launch writes files before its processes start)."""
    if not (run_dir / RUN_FILE).exists():
        write_run_file(run_dir, None, algo)


# ---------------------------------------------------------------------------------- writing
def start_run_dir(job: DictConfig, plan: RunPlan, resumed_step: Optional[int]) -> List[str]:
    """After set-up succeeded (main process): clear or trim the folder, write run.json and
    config.yaml. Returns notes for the console (leftovers of interrupted saves)."""
    from alignctl.tracking import truncate_metrics

    run_dir = plan.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    notes = remove_leftovers(run_dir)
    if resumed_step is None:
        clear_outputs(run_dir)
    else:
        truncate_metrics(run_dir, after_step=resumed_step)
    write_run_file(run_dir, plan.run_id, job.algo.name)
    write_config(job, run_dir)
    return notes


def clear_outputs(run_dir: Path) -> None:
    """What an earlier run wrote here (only alignctl's own files and folders)."""
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def write_config(job: DictConfig, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(config_text(job), encoding="utf-8")


def config_text(job: DictConfig) -> str:
    """The resolved config as YAML, except values read from the environment (``${oc.env:...}``),
    which keep their interpolation so secrets never land in a file."""
    resolved = OmegaConf.to_container(job, resolve=True)
    raw = OmegaConf.to_container(job, resolve=False)
    return OmegaConf.to_yaml(OmegaConf.create(_keep_env(raw, resolved)))


def _keep_env(raw: Any, resolved: Any) -> Any:
    if isinstance(raw, str) and "oc.env:" in raw:
        return raw
    if isinstance(raw, dict) and isinstance(resolved, dict):
        return {key: _keep_env(raw[key], resolved[key]) for key in raw}
    if isinstance(raw, list) and isinstance(resolved, list):
        return [_keep_env(r, v) for r, v in zip(raw, resolved)]
    return resolved
