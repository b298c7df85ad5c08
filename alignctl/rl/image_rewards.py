"""Image reward functions for DDPO (no download), and the sources that call them.

A reward function is ``fn(images, prompts, **columns) -> list of floats``: ``images`` a float
tensor ``[N, 3, H, W]`` in [0, 1] (CPU), ``prompts`` the N prompt strings, each dataset column a
list of N values (the per-prompt metadata).
"""

from __future__ import annotations

import importlib
import io
from typing import Dict, List, Optional, Sequence

import torch

from alignctl.errors import ConfigError


def _jpeg_kb(images: torch.Tensor) -> List[float]:
    from PIL import Image

    array = (images.detach().float().cpu() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    sizes = []
    for pixels in array:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000.0)
    return sizes


def jpeg_compressibility(images, prompts=None, **columns) -> List[float]:
    """Minus the JPEG size in kB (quality 95), as in the DDPO paper: smaller files score higher."""
    return [-kb for kb in _jpeg_kb(images)]


def jpeg_incompressibility(images, prompts=None, **columns) -> List[float]:
    """The JPEG size in kB (quality 95): larger (busier) images score higher."""
    return _jpeg_kb(images)


class ImageRewards:
    """The weighted sum of the configured image reward functions."""

    def __init__(self, functions: Sequence[str], weights: Optional[Sequence[float]] = None) -> None:
        if not functions:
            raise ConfigError("algo=ddpo needs image reward functions: reward=jpeg_compressibility or "
                              "reward.functions=[module:function]")
        self.functions = {}
        for dotted in functions:
            module_name, _, attr = dotted.partition(":")
            try:
                self.functions[attr or dotted] = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError, ValueError) as exc:
                raise ConfigError(f"reward function {dotted!r} cannot be imported: {exc}") from None
        if weights is not None and len(weights) != len(self.functions):
            raise ConfigError(f"reward.weights has {len(weights)} entries for {len(self.functions)} reward functions")
        self.weights = list(weights) if weights is not None else [1.0] * len(self.functions)

    def __call__(self, images: torch.Tensor, prompts: List[str], columns: Dict[str, list]):
        total = torch.zeros(len(prompts), dtype=torch.float64)
        per_source = {}
        for (name, fn), weight in zip(self.functions.items(), self.weights):
            try:
                values = fn(images=images, prompts=prompts, **columns)
                values = torch.as_tensor([float(v) for v in values], dtype=torch.float64)
            except Exception as exc:
                raise ConfigError(f"reward function {name} failed: {type(exc).__name__}: {exc}") from None
            if values.shape != (len(prompts),):
                raise ConfigError(f"reward function {name} returned {values.numel()} values for {len(prompts)} images")
            per_source[name] = values
            total += weight * values
        return total, per_source
