"""``algo.padding_free``: batches without padding for the offline algorithms that allow it.

The algorithm's collate still forms its usual batch; a converter then lays every sequence end to
end in one row (collate.unpad_batch for right-padded batches, collate.flatten_packed for SFT's
packed rows), and the models' attention is confined to each sequence (models.varlen).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict, Optional, Tuple

import torch
from omegaconf import DictConfig

from alignctl.data.collate import unpad_batch
from alignctl.engine.offline import PreparedData
from alignctl.errors import ConfigError
from alignctl.models.varlen import enable_padding_free, padding_free_support

Batch = Dict[str, torch.Tensor]


def use_padding_free(
    job: DictConfig,
    data: PreparedData,
    *models: Optional[torch.nn.Module],
    convert: Callable[[Batch], Batch] = unpad_batch,
    support: Callable[[torch.nn.Module], Tuple[bool, str]] = padding_free_support,
    enable: Callable[[torch.nn.Module], str] = enable_padding_free,
) -> bool:
    """Apply ``algo.padding_free`` (null: on where every held model's attention kernel supports
    it) to ``data.collate`` and ``models``; the summary says whether it is on and why. True if on.

    ``support``/``enable`` check and switch one model (causal LMs by default; reward models pass
    their own)."""
    setting = job.algo.padding_free
    if setting is False:
        data.notes.append(("padding-free", "off (algo.padding_free=false)"))
        return False
    held = [m for m in models if m is not None]
    for model in held:
        ok, reason = support(model)
        if not ok:
            if setting:
                raise ConfigError(f"algo.padding_free=true: {reason}; set algo.padding_free=false")
            data.notes.append(("padding-free", f"off ({reason})"))
            return False
    how = [enable(m) for m in held][0]
    data.collate = partial(_converted, convert, data.collate)
    data.notes.append(("padding-free", f"on ({how})"))
    return True


def _converted(convert: Callable[[Batch], Batch], collate, examples) -> Batch:
    return convert(collate(examples))
