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

from alignctl.checkpoint import STATE_FILE
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
    """Load trainable weights into ``model`` (before accelerate.prepare) and return the rest."""
    from safetensors.torch import load_file

    if not (folder / TRAINABLE_FILE).exists():
        raise AlignctlError(
            f"checkpoint {folder} holds model weights only (written under launcher=fsdp or deepspeed, whose "
            f"sharded optimizer state alignctl does not resume yet); start a new run from them with "
            f"model.name_or_path={folder / 'model'}"
        )
    weights = load_file(str(folder / TRAINABLE_FILE))
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise AlignctlError(
            f"checkpoint {folder} does not fit this model (missing {missing[:3]}, unexpected {extra[:3]}); "
            "resume with the same model, peft and algo settings as the original run"
        )
    model.load_state_dict(weights, strict=False)
    state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    return {
        "progress": TrainProgress(**state["progress"]),
        "algorithm": state.get("algorithm", {}),
        "optimizer": torch.load(folder / OPTIMIZER_FILE, weights_only=True),
        "scheduler": torch.load(folder / SCHEDULER_FILE, weights_only=True),
        "rng": torch.load(folder / RNG_FILE, weights_only=True),
        "window": torch.load(folder / WINDOW_FILE, weights_only=True),
    }


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
