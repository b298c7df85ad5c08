"""CPO (with SimPO) and ORPO end to end."""

import math

import pytest

from alignctl.cli import main
from alignctl.compose import compose_job
from alignctl.losses.cpo import CPO_LOSS_TYPES
from alignctl.tracking import read_metrics
from conftest import run_cli

QUICK = ["train.save_steps=0", "train.eval_steps=0", "train.logging_steps=1", "run.progress=false"]


def records(run_dir, split="train"):
    return [r for r in read_metrics(run_dir) if r["split"] == split]


def test_simpo_preset_is_cpo_with_simpo_defaults():
    cfg = compose_job(["algo=simpo"])
    assert cfg.algo.name == "cpo" and cfg.algo.loss_type == "simpo" and cfg.algo.cpo_alpha == 0.0


@pytest.mark.parametrize("recipe", ["smoke/cpo", "smoke/simpo", "smoke/orpo"])
def test_smoke_recipes_learn_the_separable_set(tmp_path, recipe):
    if recipe == "smoke/orpo":  # one of them through the real entry point
        result = run_cli("train", f"recipe={recipe}", f"run.output_dir={tmp_path}", *QUICK)
        assert result.returncode == 0, result.stderr
    else:
        assert main(["train", f"recipe={recipe}", f"run.output_dir={tmp_path}", *QUICK]) == 0
    train = records(tmp_path)
    assert {"loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logits/rejected", "nll_loss"} <= set(train[0])
    assert sum(r["rewards/accuracies"] for r in train[-5:]) / 5 > 0.8
    assert train[-1]["loss"] < train[0]["loss"]
    assert (tmp_path / "final_model" / "model.safetensors").is_file()
    if recipe == "smoke/simpo":
        assert all(r["nll_loss"] == 0.0 for r in train)
    if recipe == "smoke/orpo":
        assert {"log_odds_ratio", "log_odds_chosen"} <= set(train[0])


@pytest.mark.parametrize("loss_type", CPO_LOSS_TYPES)
def test_every_cpo_loss_type_trains(tmp_path, loss_type):
    assert main(["train", "recipe=smoke/cpo", f"algo.loss_type={loss_type}", "train.max_steps=2",
                 f"run.output_dir={tmp_path}", *QUICK]) == 0
    assert all(math.isfinite(r["loss"]) for r in records(tmp_path))


def test_cpo_unknown_loss_type(tmp_path):
    result = run_cli("train", "recipe=smoke/cpo", "algo.loss_type=dpo", f"run.output_dir={tmp_path}")
    assert result.returncode == 2 and "simpo" in result.stderr and "Traceback" not in result.stderr
