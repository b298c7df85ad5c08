"""Mixture-of-experts router (load-balancing) auxiliary loss: whether a run adds it, and its weight.

``algo.router_aux_loss_coef`` as TRL 1.16.0's DPOTrainer: null takes the model config's
``router_aux_loss_coef`` when the model is a mixture of experts (its config has
``output_router_logits``), 0 otherwise; a number is used as given (0 turns the loss off); a non-zero
number on a model without routers is an error. ``follow_config_flag`` (CPO, ORPO: TRL 1.16.0's
experimental trainers) keeps their rule for null: the loss is on only when the model config sets
``output_router_logits: true``.
"""

from __future__ import annotations

from typing import Optional

from alignctl.errors import ConfigError


def is_moe(model_config) -> bool:
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return hasattr(text, "output_router_logits")


def router_aux_coef(setting: Optional[float], model_config, *, follow_config_flag: bool = False) -> float:
    """The weight of the router loss for this run (0.0: off)."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    moe = is_moe(model_config)
    if setting is not None:
        if setting and not moe:
            raise ConfigError(
                f"algo.router_aux_loss_coef={setting}: {getattr(text, 'model_type', 'this model')} is not a "
                "mixture-of-experts model, so there is no router loss to weight; leave it null"
            )
        return float(setting)
    if not moe or (follow_config_flag and not getattr(text, "output_router_logits", False)):
        return 0.0
    return float(getattr(text, "router_aux_loss_coef", 0.0) or 0.0)
