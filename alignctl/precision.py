"""``precision=auto`` (the default): bf16 autocast where the hardware runs bf16 fast, fp32 otherwise.

Fast bf16 means: a CUDA GPU that supports bf16 (Ampere and later), or a CPU with native bf16
matrix instructions (AVX512-BF16 or AMX-BF16), on which oneDNN's bf16 matmuls beat fp32 ones.
Without them bf16 is emulated and slower than fp32, so auto stays at fp32. On a CPU, a model built
from ``model.arch`` narrower than 256 (the tiny test model; likewise DDPO's built-in
tiny pipeline) also stays fp32: its matmuls are too
small for the casts to pay (measured, hidden 64: fwd+bwd 24 ms fp32, 31 ms bf16; hidden 256: 80
vs 52 ms; SmolLM2's 576: 569 vs 199 ms, one thread). The choice is written
into the composed config (``precision.name`` becomes the chosen preset and ``precision.auto_reason``
says why), so the run directory's config.yaml records it and the summary prints it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

from omegaconf import DictConfig, open_dict

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cuda_bf16() -> Optional[str]:
    """The name of a CUDA GPU with bf16 support, else None."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.cuda.get_device_name(0)
    return None


def cpu_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> Tuple[str, ...]:
    """The native bf16 instruction sets this CPU advertises (Linux /proc/cpuinfo flags)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return ()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return tuple(f for f in CPU_BF16_FLAGS if f in flags)
    return ()


MIN_CPU_BF16_WIDTH = 256
TINY_SD = "tiny-sd"  # alignctl.models.diffusion.TINY_SD (not imported here: it pulls in diffusers)
TINY_SD_WIDTH = 32  # widest channel count of its UNet (block_out_channels 16, 32)


def choose_precision(arch_width: Optional[int] = None) -> Tuple[str, str]:
    """(preset name, why) for ``precision=auto`` on this machine; ``arch_width`` is the hidden size
    of a model built from ``model.arch`` (None for a loaded model)."""
    gpu = cuda_bf16()
    if gpu:
        return "bf16", f"auto: CUDA GPU with bf16 ({gpu})"
    import torch

    if torch.cuda.is_available():
        return "fp32", "auto: this CUDA GPU has no bf16"
    flags = cpu_bf16_flags()
    if not flags:
        return "fp32", "auto: CPU without native bf16 (no avx512_bf16 / amx_bf16): bf16 would be emulated, slower"
    if arch_width is not None and arch_width < MIN_CPU_BF16_WIDTH:
        return "fp32", f"auto: a built-in model of width {arch_width} < {MIN_CPU_BF16_WIDTH} is too small for CPU bf16 to pay"
    return "bf16", f"auto: CPU with native bf16 ({', '.join(flags)})"


def resolve_auto_precision(job: DictConfig) -> DictConfig:
    """Replace ``precision.name=auto`` by the chosen preset, with the reason beside it (in place)."""
    if job.precision.name != "auto":
        return job
    arch = job.model.get("arch")
    width = arch.hidden_size if arch is not None else None
    if job.algo.name == "ddpo" and job.model.name_or_path == TINY_SD:
        width = TINY_SD_WIDTH  # the built-in random pipeline: as small as the tiny LM
    name, reason = choose_precision(width)
    with open_dict(job):
        job.precision.name = name
        job.precision.auto_reason = reason
    return job
