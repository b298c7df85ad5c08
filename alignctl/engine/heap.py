"""``train.trim_heap``: hand glibc's free heap pages back to the system around each backward pass.

On a CPU every tensor lives in the C library's heap. Tensors of up to 32 MB come from the heap
proper, and a freed one leaves a hole that stays resident until something reuses it; the backward
pass frees activations and allocates gradients in a different order, so the holes add to the peak.
``malloc_trim(0)`` returns every whole free page inside the heap (the pages stay mapped; the next
use faults them back in). The offline loop trims between forward and backward, where the forward's
temporaries are gone; at a few points during backward (after the gradients of evenly spaced
parameters are accumulated), where freed activations and new gradients interleave; and after the
optimizer step, when the gradients are freed. The README's Performance section has the figures.
On a GPU the tensors are not in this heap.

The other thing that grows a CPU run's memory step after step is oneDNN's primitive cache: bf16
matmuls run as oneDNN primitives compiled for each shape, and variable-length batches bring new
shapes every step; the cache keeps up to 1024 of them. :func:`bound_onednn_cache` lowers that.
"""

from __future__ import annotations

import ctypes
import os
from typing import Callable, List, Optional, Tuple

import torch

from alignctl.errors import ConfigError


def malloc_trim() -> Optional[Callable[[], None]]:
    """glibc's ``malloc_trim(0)`` as a function, or None where the C library has none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library this process already uses
    except (AttributeError, OSError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int

    def release() -> None:
        trim(0)

    return release


def check_trim_heap(setting: Optional[bool]) -> None:
    """``train.trim_heap=true`` is refused where there is nothing to call (read-only check)."""
    if setting and malloc_trim() is None:
        raise ConfigError("train.trim_heap=true needs glibc's malloc_trim, which this system's C library "
                          "does not have; set train.trim_heap=null (on where available) or false")


def heap_trimmer(setting: Optional[bool], device: torch.device) -> Optional[Callable[[], None]]:
    """What the loop calls around each backward pass, or None. null: on for CPU runs under glibc."""
    if setting is False or (setting is None and device.type != "cpu"):
        return None
    return malloc_trim()


ONEDNN_CACHE_VARIABLE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ONEDNN_CACHE_CAPACITY = 128  # one step's shapes (forward, recomputation, backward) fit; README has the figures


def bound_onednn_cache() -> Tuple[str, str]:
    """Keep oneDNN's primitive cache at :data:`ONEDNN_CACHE_CAPACITY` unless the environment sets it.
    oneDNN reads the variable when it creates its first primitive, so this runs before the model does
    any work. Returns the summary row saying which capacity applies."""
    global _capacity_set_here
    value = os.environ.get(ONEDNN_CACHE_VARIABLE)
    if value is not None and not (_capacity_set_here and value == str(ONEDNN_CACHE_CAPACITY)):
        return ("oneDNN primitive cache", f"{value} (from {ONEDNN_CACHE_VARIABLE})")
    os.environ[ONEDNN_CACHE_VARIABLE] = str(ONEDNN_CACHE_CAPACITY)
    _capacity_set_here = True  # a later run in this process is not told the user chose it
    return ("oneDNN primitive cache", f"{ONEDNN_CACHE_CAPACITY} (set {ONEDNN_CACHE_VARIABLE} to change)")


_capacity_set_here = False


def trim_during_backward(model: torch.nn.Module, trim: Callable[[], None], points: int = 4) -> List:
    """Call ``trim`` ``points`` times in each backward pass: once the gradient of each of ``points``
    evenly spaced trainable parameters is accumulated. Returns the hook handles."""
    params = [p for p in model.parameters() if p.requires_grad]
    picks = sorted({len(params) * k // (points + 1) for k in range(1, points + 1)}) if params else []

    def hook(_param: torch.Tensor) -> None:
        trim()

    return [params[i].register_post_accumulate_grad_hook(hook) for i in picks]
