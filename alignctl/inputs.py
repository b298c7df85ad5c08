"""Checks of a run's inputs (model settings and paths, LoRA settings, data files) made before
anything is loaded or written, so a bad input stops the run at once with one clear line.

The same checks run again where the inputs are used (the loaders), so code that calls a driver
directly gets the same errors; these only make them early and cheap.
"""

from __future__ import annotations


def check_inputs(job) -> None:
    from alignctl.data.load import check_files
    from alignctl.models.load import check_model_config
    from alignctl.models.peft_wrap import check_peft_config

    check_peft_config(job.peft)
    if job.algo.name == "ddpo":  # a diffusion pipeline and prompt sources of its own: algos/ddpo.py checks them
        return
    check_model_config(job.model)
    check_files(job.dataset)
