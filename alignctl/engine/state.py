"""Everything a checkpoint holds beyond the model, so a resumed run logs exactly what the
uninterrupted run would have: trainable weights, optimizer, scheduler, RNG states, the data position
and the partly filled logging window. Everything loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from alignctl.checkpoint import STATE_FILE, UnreadableCheckpoint
from alignctl.errors import AlignctlError

TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
WINDOW_FILE = "window.pt"


@dataclass
class TrainProgress:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (its shuffle is seeded with train.seed + epoch)
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    units_total: int = 0  # throughput units trained (tokens, samples, images)
    skipped_nonfinite: int = 0


def trainable_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Trainable parameters by name (tied weights appear once: named_parameters de-duplicates)."""
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def write_training_state(
    folder: Path,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    window_state: Dict[str, Any],
    progress: TrainProgress,
    algorithm_state: Optional[Dict[str, Any]],
) -> Dict[str, Any]:
    """Write the state files into ``folder``; returns the JSON-able part for trainer_state.json."""
    from safetensors.torch import save_file

    save_file(trainable_state(model), str(folder / TRAINABLE_FILE))
    torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)
    torch.save(scheduler.state_dict(), folder / SCHEDULER_FILE)
    torch.save(_rng_state(), folder / RNG_FILE)
    torch.save(window_state, folder / WINDOW_FILE)
    return {"progress": asdict(progress), "algorithm": algorithm_state or {}}


def read_training_state(folder: Path, model: torch.nn.Module) -> Dict[str, Any]:
    """Load trainable weights into ``model`` (before accelerate.prepare) and return the rest.

    Every file is read before anything is changed: a file that cannot be read raises
    ``UnreadableCheckpoint`` (resume=auto then tries an older checkpoint); weights of other names or
    shapes than the model's are a clear error."""
    if not (folder / TRAINABLE_FILE).exists() and (folder / "model").is_dir():
        raise AlignctlError(
            f"checkpoint {folder} holds model weights only (written under launcher=fsdp or deepspeed, whose "
            f"sharded optimizer state alignctl does not resume yet); start a new run from them with "
            f"model.name_or_path={folder / 'model'}"
        )
    loaded = _read_files(folder)
    _check_fits(folder, loaded.pop("weights"), model)
    return loaded


def _read_files(folder: Path) -> Dict[str, Any]:
    from safetensors.torch import load_file

    readers = {
        "weights": (TRAINABLE_FILE, lambda path: load_file(str(path))),
        "state": (STATE_FILE, lambda path: json.loads(path.read_text(encoding="utf-8"))),
        **{key: (name, lambda path: torch.load(path, weights_only=True)) for key, name in (
            ("optimizer", OPTIMIZER_FILE), ("scheduler", SCHEDULER_FILE), ("rng", RNG_FILE), ("window", WINDOW_FILE))},
    }
    loaded: Dict[str, Any] = {}
    for key, (name, read) in readers.items():
        try:
            loaded[key] = read(folder / name)
        except Exception as exc:  # truncated, corrupt or missing: any reader error means unusable
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise UnreadableCheckpoint(f"{name} cannot be read ({reason})") from None
    state = loaded.pop("state")
    loaded["progress"] = TrainProgress(**state["progress"])
    loaded["algorithm"] = state.get("algorithm", {})
    return loaded


def _check_fits(folder: Path, weights: Dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(weights) != set(params):
        missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
        raise AlignctlError(
            f"checkpoint {folder} does not fit this model (missing {missing[:3]}, unexpected {extra[:3]}); "
            "resume with the same model, peft and algo settings as the original run"
        )
    for name, param in params.items():
        if weights[name].shape != param.shape:
            raise AlignctlError(
                f"checkpoint {folder} does not fit this model: {name} has shape {list(weights[name].shape)} in the "
                f"checkpoint and {list(param.shape)} in the model; resume with the same model settings "
                "(model.*, peft.*) as the original run"
            )
    model.load_state_dict(weights, strict=False)


def _rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": _to_lists(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    random.setstate(_to_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(value):
    return [_to_lists(v) for v in value] if isinstance(value, tuple) else value


def _to_tuples(value):
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value
