"""How a saved LoRA adapter names its base, so plain peft reloads it.

peft reloads an adapter from ``adapter_config.json``'s ``base_model_name_or_path``. alignctl
records the base as the run loaded it: a hub id as given (with ``model.revision``), a local folder
as an absolute path. A base that ``from_pretrained`` cannot rebuild by itself is saved beside the
adapter in ``base/`` and recorded by that folder's absolute path:

- the built-in tiny model (random weights built in-process);
- a GGUF file (dequantized on load; saved as plain safetensors, its quantizer detached);
- the one-output classifier of a reward model (its config, ``num_labels=1`` and the pad token,
  differs from the hub model's).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, Optional

import torch

from alignctl.config import ModelConfig

BASE_DIR = "base"
ADAPTER_CONFIG = "adapter_config.json"


def is_adapter(model) -> bool:
    """A peft model (LoRA adapter over a base)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def loadable_base(cfg: ModelConfig) -> Optional[str]:
    """What ``from_pretrained`` can reload the run's base from: a hub id as given, a local folder as
    an absolute path; None for the tiny model and GGUF files."""
    if cfg.arch is not None or cfg.gguf_file:
        return None
    path = Path(cfg.name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else cfg.name_or_path


def record_base(
    model,
    folder: Path,
    final_folder: Path,
    cfg: ModelConfig,
    processors: Iterable = (),
    state_dict: Optional[Dict[str, torch.Tensor]] = None,
) -> str:
    """Make the adapter saved in ``folder`` name a base plain peft can load; returns what it names.

    ``folder`` is where the files are written now, ``final_folder`` where they end up (saves are
    written to a temporary folder and renamed). ``state_dict``: the full weights gathered from a
    sharded model (FSDP/DeepSpeed), used instead of the model's own.
    """
    adapter = next(iter(model.peft_config.values()))
    reference = loadable_base(cfg)
    revision = cfg.revision
    if reference is None or str(adapter.task_type) == "SEQ_CLS":
        save_base(model, folder / BASE_DIR, processors, state_dict)
        reference, revision = str((Path(final_folder) / BASE_DIR).resolve()), None
    path = folder / ADAPTER_CONFIG
    values = json.loads(path.read_text(encoding="utf-8"))
    values["base_model_name_or_path"] = reference
    values["revision"] = revision
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return reference


def save_base(model, folder: Path, processors: Iterable = (), state_dict=None) -> None:
    """The base weights of a peft model (adapter layers removed, not merged) as a plain model."""
    weights = base_state_dict(state_dict if state_dict is not None else model.state_dict())
    # A GGUF-loaded base was loaded with its quantizer detached (models/load.py): plain fp32 weights.
    model.get_base_model().save_pretrained(folder, safe_serialization=True, state_dict=weights)
    for processor in processors:
        processor.save_pretrained(folder)


def base_state_dict(peft_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A peft model's state dict -> its base model's: drop the adapter tensors (``lora_*``, the
    trained copies of ``modules_to_save``) and unwrap ``base_layer`` / ``original_module``."""
    prefix = "base_model.model."
    base = {}
    for key, value in peft_state.items():
        parts = key[len(prefix):].split(".") if key.startswith(prefix) else key.split(".")
        if any(p.startswith("lora_") for p in parts) or "modules_to_save" in parts:
            continue
        base[".".join(p for p in parts if p not in ("base_layer", "original_module"))] = value
    return base

