"""SFT end to end, as a user runs it."""

import json

import pytest
import torch

from alignctl.cli import main
from alignctl.tracking import read_metrics
from conftest import run_cli


def train_losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"]


def test_smoke_recipe_through_the_cli(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("train", "recipe=smoke/sft", f"run.output_dir={run_dir}", "run.progress=false")
    assert result.returncode == 0, result.stderr
    assert "alignctl run summary" in result.stderr and "tokens/s" in result.stderr
    assert (run_dir / "config.yaml").is_file()
    records = read_metrics(run_dir)
    assert records[0]["step"] == 1 and {"loss", "lr", "tokens_per_s"} <= set(records[0])
    assert any(r["split"] == "eval" for r in records)
    checkpoints = list((run_dir / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step-0000015"]
    assert (checkpoints[0] / "model" / "model.safetensors").is_file()
    final = run_dir / "final_model"
    assert (final / "model.safetensors").is_file() and (final / "config.yaml").is_file()
    assert not list(final.glob("*.bin"))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    prompt = tokenizer("What is the capital of Peru?", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]

    again = run_cli("train", "recipe=smoke/sft", f"run.output_dir={run_dir}")
    assert again.returncode == 2 and "already holds a finished run" in again.stderr


def test_loss_falls_by_more_than_half_on_memorisable_data(tmp_path):
    code = main(
        [
            "train", "recipe=smoke/sft", "train.max_steps=80", "train.lr=3e-3", "train.eval_steps=0",
            "train.save_steps=0", "dataset.eval_fraction=0", "algo.max_length=64", "train.logging_steps=1",
            f"run.output_dir={tmp_path}", "run.progress=false",
        ]
    )
    assert code == 0
    losses = train_losses(tmp_path)
    assert len(losses) == 80
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], (losses[0], losses[-5:])


def test_same_seed_gives_identical_losses(tmp_path):
    args = ["train", "recipe=smoke/sft", "train.max_steps=6", "train.logging_steps=1", "train.save_steps=0",
            "train.eval_steps=0", "run.progress=false"]
    assert main(args + [f"run.output_dir={tmp_path / 'a'}"]) == 0
    assert main(args + [f"run.output_dir={tmp_path / 'b'}"]) == 0
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
    assert main(args + [f"run.output_dir={tmp_path / 'c'}", "train.seed=7"]) == 0
    assert train_losses(tmp_path / "c") != train_losses(tmp_path / "a")


@pytest.mark.parametrize(
    "extra",
    [
        ["dataset=smoke_chat"],
        ["dataset=smoke_text", "algo.packing=true"],
        ["algo.neftune_noise_alpha=5", "precision=bf16", "train.gradient_accumulation_steps=2"],
    ],
    ids=["chat", "text-packed", "neftune-bf16-accum"],
)
def test_other_formats_and_options_train(tmp_path, extra):
    args = ["train", "recipe=smoke/sft", "train.max_steps=4", "train.save_steps=0", "train.eval_steps=0",
            f"run.output_dir={tmp_path}", "run.progress=false", *extra]
    assert main(args) == 0
    losses = train_losses(tmp_path)
    assert losses and all(l == l for l in losses)  # logged, finite
    assert (tmp_path / "final_model" / "model.safetensors").is_file()


def test_lora_saves_adapter_and_merged_weights(tmp_path):
    args = ["train", "recipe=smoke/sft", "peft=lora", "peft.merge_on_save=true", "train.max_steps=3",
            "train.save_steps=0", "train.eval_steps=0", f"run.output_dir={tmp_path}", "run.progress=false"]
    assert main(args) == 0
    final = tmp_path / "final_model"
    assert (final / "adapter_model.safetensors").is_file()
    assert not (final / "model.safetensors").exists()
    assert (final / "merged" / "model.safetensors").is_file()
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["r"] == 16


def test_qlora_without_gpu_and_fp16_on_cpu_are_clear_errors(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: both would run")
    result = run_cli("train", "recipe=smoke/sft", "peft=qlora", f"run.output_dir={tmp_path}")
    assert result.returncode == 2 and "needs a CUDA GPU" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("train", "recipe=smoke/sft", "precision=fp16", f"run.output_dir={tmp_path}")
    assert result.returncode == 2 and "precision=fp16 needs a CUDA GPU" in result.stderr


def test_checkpoint_pruning_tensorboard_and_warmup_schedule(tmp_path):
    args = ["train", "recipe=smoke/sft", "train.max_steps=6", "train.save_steps=2", "train.save_total_limit=1",
            "train.logging_steps=1", "train.eval_steps=0", "train.lr=1e-3", "train.lr_scheduler=linear",
            "train.warmup_steps=2", "run.tensorboard=true", f"run.output_dir={tmp_path}", "run.progress=false"]
    assert main(args) == 0
    assert [c.name for c in (tmp_path / "checkpoints").iterdir()] == ["step-0000004"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    lrs = [r["lr"] for r in train_records(tmp_path)]
    # linear warmup over 2 steps to 1e-3, then linear decay to 0 at step 6 (lr logged before stepping)
    assert lrs == pytest.approx([0.0, 5e-4, 1e-3, 7.5e-4, 5e-4, 2.5e-4])


def test_epochs_decide_the_step_count_when_max_steps_is_unset(tmp_path):
    args = ["train", "recipe=smoke/sft", "train.max_steps=-1", "train.num_epochs=2", "train.per_device_batch_size=16",
            "dataset.eval_fraction=0", "train.logging_steps=1", "train.save_steps=0", f"run.output_dir={tmp_path}",
            "run.progress=false"]
    assert main(args) == 0
    # 34 rows in batches of 16: 3 batches an epoch, 2 epochs
    assert [r["step"] for r in train_records(tmp_path)] == [1, 2, 3, 4, 5, 6]


def train_records(run_dir):
    return [r for r in read_metrics(run_dir) if r["split"] == "train"]


def test_group_by_length_reduces_padding(tmp_path):
    def mean_padding(name, *extra):
        args = ["train", "recipe=smoke/dpo", "train.max_steps=8", "train.logging_steps=1", "train.save_steps=0",
                "train.eval_steps=0", "train.per_device_batch_size=4", f"run.output_dir={tmp_path / name}",
                "run.progress=false", "algo.padding_free=false", *extra]  # padded batches: padding to reduce
        assert main(args) == 0
        values = [r["padding"] for r in train_records(tmp_path / name)]
        return sum(values) / len(values)

    plain = mean_padding("plain")
    grouped = mean_padding("grouped", "train.group_by_length=true", "train.length_group_batches=4")
    assert grouped < plain
