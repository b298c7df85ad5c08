"""DPO and reward modelling end to end."""

import json
import math

import pytest

from alignctl.cli import main
from alignctl.losses.dpo import DPO_LOSS_TYPES
from alignctl.tracking import read_metrics
from conftest import run_cli

DPO_METRICS = {
    "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected",
}
QUICK = ["train.save_steps=0", "train.eval_steps=0", "train.logging_steps=1", "run.progress=false"]


def records(run_dir, split="train"):
    return [r for r in read_metrics(run_dir) if r["split"] == split]


def test_dpo_smoke_recipe_through_the_cli(tmp_path):
    result = run_cli("train", "recipe=smoke/dpo", f"run.output_dir={tmp_path}", "train.logging_steps=1", "run.progress=false")
    assert result.returncode == 0, result.stderr
    train, evals = records(tmp_path), records(tmp_path, "eval")
    assert DPO_METRICS <= set(train[0]) and DPO_METRICS <= set(evals[-1])
    # policy == reference at the first step: the sigmoid loss is exactly log 2
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert train[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    # a separable set: the implicit reward ranks chosen above rejected after training
    assert sum(r["rewards/accuracies"] for r in train[-5:]) / 5 > 0.8
    assert evals[-1]["rewards/accuracies"] > 0.5
    assert (tmp_path / "final_model" / "model.safetensors").is_file()


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_every_dpo_loss_type_trains(tmp_path, loss_type):
    args = ["train", "recipe=smoke/dpo", f"algo.loss_type={loss_type}", "train.max_steps=2",
            "algo.label_smoothing=0.1" if loss_type in ("robust", "exo_pair") else "algo.label_smoothing=0",
            f"run.output_dir={tmp_path}", *QUICK]
    assert main(args) == 0
    losses = [r["loss"] for r in records(tmp_path)]
    assert len(losses) == 2 and all(math.isfinite(l) for l in losses)


def test_unknown_loss_type_lists_valid_ones(tmp_path):
    result = run_cli("train", "recipe=smoke/dpo", "algo.loss_type=sigmoud", f"run.output_dir={tmp_path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "algo.loss_type='sigmoud'" in result.stderr and "apo_zero" in result.stderr


def dpo_losses(tmp_path, name, *extra, steps=4):
    out = tmp_path / name
    assert main(["train", "recipe=smoke/dpo", f"train.max_steps={steps}", f"run.output_dir={out}", *QUICK, *extra]) == 0
    return [r["loss"] for r in records(out)]


def test_precomputed_reference_matches_live_reference(tmp_path):
    live = dpo_losses(tmp_path, "live", "algo.precompute_ref_logps=false")
    pre = dpo_losses(tmp_path, "pre", "algo.precompute_ref_logps=true")
    assert pre[0] == pytest.approx(math.log(2), abs=1e-6)
    assert pre == pytest.approx(live, abs=1e-5)


def test_precomputing_builds_no_reference_copy(tiny_tokenizer):
    """The starting policy itself gives the precomputed log-probs; no second model is built."""
    from alignctl.algos.preference import build_policy_with_reference
    from alignctl.compose import compose_job

    job = compose_job(["recipe=smoke/dpo", "algo.precompute_ref_logps=true"])
    model, reference = build_policy_with_reference(job, tiny_tokenizer, reference_free=False)
    assert reference.mode == "initial" and reference.model is model.model
    reference.release()
    assert reference.mode == "precomputed" and reference.model is None


def test_lora_uses_the_adapter_off_as_reference(tmp_path):
    losses = dpo_losses(tmp_path, "lora", "peft=lora", "train.lr=1e-2")
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[-1] < losses[0]
    assert (tmp_path / "lora" / "final_model" / "adapter_model.safetensors").is_file()


def test_reference_free_and_separate_reference_model(tmp_path):
    free = dpo_losses(tmp_path, "free", "algo.reference_free=true", steps=2)
    assert math.isfinite(free[0])
    # a reference loaded from a path: the tiny model saved by a first run
    ref_dir = tmp_path / "free" / "final_model"
    other = dpo_losses(tmp_path, "other", f"model.ref_name_or_path={ref_dir}", steps=2)
    assert other[0] != pytest.approx(math.log(2), abs=1e-4)  # policy (fresh) differs from that reference


def test_conversational_pairs_train(tmp_path):
    losses = dpo_losses(tmp_path, "chat", "dataset=smoke_pref_chat", steps=2)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)


def test_reward_smoke_recipe_and_reload(tmp_path):
    result = run_cli("train", "recipe=smoke/reward", f"run.output_dir={tmp_path}", "run.progress=false")
    assert result.returncode == 0, result.stderr
    evals = records(tmp_path, "eval")
    assert evals[-1]["accuracy"] > 0.5
    assert {"rewards/chosen", "rewards/rejected", "loss"} <= set(evals[-1])

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    final = tmp_path / "final_model"
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert model.config.num_labels == 1
    with torch.no_grad():
        good = model(**tokenizer("What is the capital of Peru? It is Lima.<|im_end|>", return_tensors="pt")).logits
        bad = model(**tokenizer("What is the capital of Peru? I don't know.<|im_end|>", return_tensors="pt")).logits
    assert good.shape == (1, 1) and good.item() > bad.item()


def test_reward_margin_column(tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Capital {i}?", "chosen": " It is Rome.", "rejected": " I don't know.", "margin": 1.0}
            for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["train", "recipe=smoke/reward", f"dataset.path={data}", "dataset.eval_fraction=0",
            "train.max_steps=2", f"run.output_dir={tmp_path / 'run'}", *QUICK]
    assert main(args) == 0
    first = records(tmp_path / "run")[0]
    # untrained head: rewards near 0, so the loss is near -log sigmoid(-1) = log(1 + e)
    assert first["loss"] == pytest.approx(math.log(1 + math.e), abs=0.2)


def test_bco_running_mean_uses_every_process_batch_mean():
    import torch

    from alignctl.algos.dpo import GatheredMoments

    class TwoProcesses:  # another process contributed a batch mean of 3.0
        @staticmethod
        def gather(tensor):
            return torch.cat([tensor, torch.tensor([3.0])])

    moments = GatheredMoments(TwoProcesses())
    moments.update(torch.tensor(1.0))
    assert moments.mean == pytest.approx(2.0) and moments.count == pytest.approx(2.0)
