"""GRPO, RLOO and iterative SFT end to end: CLI runs, exact resume, learning, the Python API."""

import pytest
import torch

from alignctl.cli import main
from alignctl.tracking import read_metrics
from test_resume_faults import kill_at_checkpoint_then_resume

QUIET = ["run.progress=false", "algo.sample_every=0"]


def train(recipe, tmp_path, *extra, name="run"):
    out = tmp_path / name
    assert main(["train", f"recipe=smoke/{recipe}", *QUIET, *extra, f"run.output_dir={out}"]) == 0
    return [r for r in read_metrics(out) if r["split"] == "train"]


def test_grpo_logs_group_metrics_and_skips_the_reference_at_beta_zero(tmp_path):
    records = train("grpo", tmp_path, "train.max_steps=2")
    expected = {"reward", "reward_std", "rewards/length_target/mean", "rewards/length_target/std",
                "frac_reward_zero_std", "completions/mean_length", "completions/min_length",
                "completions/max_length", "completions/clipped_ratio", "clip_ratio/low_mean",
                "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy", "time/generate", "tokens_per_s"}
    assert expected <= set(records[0]) and "kl" not in records[0]
    with_kl = train("grpo", tmp_path, "train.max_steps=2", "algo.beta=0.04", "algo.loss_type=grpo",
                    "algo.mini_batch_size=16", name="kl")  # one mini-batch: the first sees the reference policy
    assert with_kl[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the first step


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_grpo_loss_types_and_iterations_run(tmp_path, loss_type):
    records = train("grpo", tmp_path, "train.max_steps=1", f"algo.loss_type={loss_type}", "algo.num_iterations=2",
                    "algo.epsilon_high=0.28", "algo.mask_truncated_completions=true", "algo.scale_rewards=batch")
    assert torch.isfinite(torch.tensor(records[0]["loss"]))


def test_rloo_first_update_sees_ratio_one_and_kl_zero(tmp_path):
    records = train("rloo", tmp_path, "train.max_steps=1", "algo.num_ppo_epochs=1", "algo.mini_batch_size=8")
    assert records[0]["policy/ratio"] == pytest.approx(1.0, abs=1e-4)
    assert records[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert records[0]["objective/rlhf_reward"] == pytest.approx(records[0]["objective/scores"], abs=1e-5)


def test_iterative_sft_keeps_the_best_per_prompt_and_saves_every_round(tmp_path):
    records = train("iterative_sft", tmp_path, "train.max_steps=2", "train.save_steps=1")
    assert [r["round/kept"] for r in records] == [4.0, 4.0]  # batch_size 4 prompts, the best of each
    assert records[0]["round/kept_score_mean"] >= records[0]["round/reward"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-0000001"]
    kept = train("iterative_sft", tmp_path, "train.max_steps=1", "algo.selection=threshold",
                 "algo.score_threshold=2.0", name="none_kept")
    assert kept[0]["round/kept"] == 0.0 and kept[0]["loss"] == 0.0  # nothing scores 2: no update


def test_select_kept():
    from alignctl.algos.iterative_sft import select_kept

    scores = torch.tensor([0.1, 0.9, 0.5, float("nan"), float("nan"), 0.2])
    assert select_kept(scores, 3, "best", None).tolist() == [1, 5]
    assert select_kept(scores, 2, "best", None).tolist() == [1, 2, 5]
    assert select_kept(scores, 3, "threshold", 0.5).tolist() == [1, 2]


def test_dataset_columns_reach_reward_functions(tmp_path):
    records = train("grpo", tmp_path, "train.max_steps=1", "dataset=arithmetic", "reward=arithmetic",
                    "generation.max_new_tokens=8", "algo.max_prompt_length=64")
    assert "rewards/arithmetic_correct/mean" in records[0] and "rewards/answer_format/mean" in records[0]


@pytest.mark.parametrize("recipe", ["grpo", "iterative_sft"])
def test_sigkill_then_resume_logs_exactly_the_uninterrupted_numbers(tmp_path, recipe):
    keys = ("loss", "completions/mean_length", "rewards/length_target/mean")
    steps = ["train.max_steps=12", "train.save_steps=2", *QUIET]
    args = ["train", f"recipe=smoke/{recipe}", *steps]
    assert main(args + [f"run.output_dir={tmp_path / 'whole'}"]) == 0
    killed = tmp_path / "killed"
    kill_at_checkpoint_then_resume(args, killed, "step-0000002")

    def numbers(run_dir):
        return [(r["step"], *(r[k] for k in keys)) for r in read_metrics(run_dir) if r["split"] == "train"]

    assert numbers(killed) == numbers(tmp_path / "whole")


LEARNING = {
    # algorithm: (extra overrides, reward key, margin)
    "grpo": (["train.lr=2e-3", "algo.batch_size=8"], "reward", 0.15),
    "rloo": (["train.lr=3e-4", "algo.batch_size=8", "algo.rloo_k=4", "algo.mini_batch_size=16",
              "algo.kl_coef=0.01"], "env/reward", 0.15),
    "iterative_sft": (["train.lr=2e-3", "algo.batch_size=8", "algo.sft_epochs=2"], "round/reward", 0.15),
}


@pytest.mark.parametrize("algo", sorted(LEARNING))
def test_learning_raises_the_mean_reward(tmp_path, algo):
    """The length reward (target 40 characters) rises clearly over a short seeded tiny-model run."""
    extra, key, margin = LEARNING[algo]
    records = train(algo, tmp_path, "train.max_steps=30", "generation.max_new_tokens=32",
                    "dataset.columns.unused_target=target_length", *extra)
    rewards = [r[key] for r in records]
    first, last = sum(rewards[:6]) / 6, sum(rewards[-6:]) / 6
    assert last > first + margin, (first, last)


def tiny_policy():
    from alignctl.config import ArchConfig
    from alignctl.models.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(512)
    return build_tiny_model(ArchConfig(), tokenizer), tokenizer


def test_iterative_sft_trainer_step_api():
    from alignctl.api import IterativeSFTTrainer
    from alignctl.errors import ConfigError

    model, tokenizer = tiny_policy()
    trainer = IterativeSFTTrainer(model=model, tokenizer=tokenizer, learning_rate=1e-3, max_length=32)
    completion_tokens = len(tokenizer(" Paris.", add_special_tokens=False)["input_ids"]) + 1  # + EOS
    first = trainer.step(texts=["Capital of France?"], texts_labels=[" Paris."])
    assert first["num_tokens"] == completion_tokens  # the prompt carries no loss
    for _ in range(5):
        last = trainer.step(texts=["Capital of France?"], texts_labels=[" Paris."])
    assert last["loss"] < first["loss"] - 0.5
    ids = torch.tensor(tokenizer("abc def")["input_ids"])
    stats = trainer.step(input_ids=[ids], attention_mask=[torch.ones_like(ids)], labels=[ids])
    assert stats["num_tokens"] == len(ids) - 1
    with pytest.raises(ConfigError, match="either input_ids"):
        trainer.step()
    with pytest.raises(ConfigError, match="2 texts but 1 texts_labels"):
        trainer.step(texts=["a", "b"], texts_labels=["c"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algo=grpo", "algo.num_generations=1"], "algo.num_generations=1: must be >= 2"),
        (["algo=grpo", "algo.batch_size=3", "algo.num_generations=3", "algo.mini_batch_size=2"], "must be a multiple"),
        (["algo=grpo", "algo.loss_type=ppo"], "algo.loss_type='ppo': use one of grpo, bnpo, dr_grpo, dapo"),
        (["algo=grpo", "algo.scale_rewards=std"], "algo.scale_rewards='std': use one of group, batch, none"),
        (["algo=rloo", "algo.rloo_k=1"], "algo.rloo_k=1: must be >= 2"),
        (["algo=iterative_sft", "algo.selection=threshold"], "needs algo.score_threshold"),
        (["algo=grpo", "reward=none"], "needs a reward"),
    ],
)
def test_bad_settings_are_one_clear_line(tmp_path, overrides, message, capsys):
    args = ["train", "model=tiny", "dataset=smoke_prompts", "reward=length", *overrides, f"run.output_dir={tmp_path}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()), err
