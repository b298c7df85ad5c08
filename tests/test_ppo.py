"""PPO end to end: the CLI run, the step() API, exact resume after SIGKILL, DDP, learning, bad input."""

import pytest
import torch

from alignctl.cli import main
from alignctl.tracking import read_metrics
from conftest import run_cli
from test_resume_faults import kill_at_checkpoint_then_resume

RUN = ["train", "recipe=smoke/ppo", "run.progress=false"]
# Values that depend only on the samples, scores and weights (not on wall-clock time).
DETERMINISTIC = ("loss", "env/reward_mean", "objective/kl", "objective/kl_coef", "ppo/policy/clipfrac",
                 "ppo/val/vpred", "tokens/responses_len_mean")


def deterministic(run_dir):
    return [(r["step"], *(r[k] for k in DETERMINISTIC)) for r in read_metrics(run_dir) if r["split"] == "train"]


def test_cli_run_logs_reference_metric_names_and_saves_policy_and_value_head(tmp_path):
    assert main(RUN + ["train.max_steps=4", "algo.sample_every=2", f"run.output_dir={tmp_path}"]) == 0
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    expected = {
        "objective/kl", "objective/kl_coef", "objective/entropy", "env/reward_mean", "env/reward_std",
        "ppo/policy/clipfrac", "ppo/policy/approxkl", "ppo/val/vpred", "ppo/val/clipfrac", "ppo/returns/mean",
        "ppo/loss/total", "time/ppo/generate", "time/ppo/score", "time/ppo/forward_pass", "time/ppo/optimize_step",
        "env/reward/length_target", "tokens_per_s", "lr",
    }
    assert expected <= set(records[0])
    assert records[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before any update
    samples = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 4  # steps 2 and 4, two samples each
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "final_model")
    assert (tmp_path / "final_model" / "value_head.safetensors").is_file()


def test_sigkill_then_resume_logs_exactly_the_uninterrupted_numbers(tmp_path):
    steps = ["train.max_steps=60", "train.save_steps=3", "algo.sample_every=0"]
    assert main(RUN + steps + [f"run.output_dir={tmp_path / 'whole'}"]) == 0
    killed = tmp_path / "killed"
    kill_at_checkpoint_then_resume(RUN + steps, killed, "step-0000003")
    assert deterministic(killed) == deterministic(tmp_path / "whole")


def test_resume_restores_kl_controller_and_score_statistics(tmp_path):
    steps = ["train.max_steps=4", "train.save_steps=2", "algo.use_score_scaling=true", "algo.use_score_norm=true"]
    assert main(RUN + steps + [f"run.output_dir={tmp_path}"]) == 0
    import json

    state = json.loads((tmp_path / "checkpoints" / "step-0000002" / "trainer_state.json").read_text())["algorithm"]
    assert state["kl_ctl"]["value"] < 0.2  # adaptive controller moved (kl below target)
    assert state["running"]["count"] == pytest.approx(16)  # two batches of 8 scores


def test_learning_raises_the_mean_score(tmp_path):
    """An easy rule-based reward (length target) rises clearly over a short seeded tiny-model run."""
    args = RUN + ["train.max_steps=40", "train.lr=1e-3", "algo.init_kl_coef=0.01", "algo.sample_every=0",
                  "algo.batch_size=16", "algo.mini_batch_size=8", "generation.max_new_tokens=32",
                  "dataset.columns.unused_target=target_length",  # every row: the default 40-character target
                  f"run.output_dir={tmp_path}"]
    assert main(args) == 0
    rewards = [r["env/reward_mean"] for r in read_metrics(tmp_path)]
    first, last = sum(rewards[:8]) / 8, sum(rewards[-8:]) / 8
    assert last > first + 0.15, (first, last)


def tiny_policy():
    from alignctl.config import ArchConfig
    from alignctl.models.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(512)
    return build_tiny_model(ArchConfig(), tokenizer), tokenizer


def fixed_batch(n=4):
    generator = torch.Generator().manual_seed(0)
    queries = [torch.randint(5, 500, (3 + i,), generator=generator) for i in range(n)]
    responses = [torch.randint(5, 500, (6 - i % 3,), generator=generator) for i in range(n)]
    scores = [torch.tensor(float(i)) for i in range(n)]
    return queries, responses, scores


def test_step_api_runs_one_update_and_moves_the_kl_controller():
    from alignctl.api import PPOTrainer

    model, tokenizer = tiny_policy()
    trainer = PPOTrainer(model=model, tokenizer=tokenizer, batch_size=4, mini_batch_size=4, ppo_epochs=1,
                         learning_rate=1e-3, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = trainer.step(*fixed_batch())
    # one mini-batch, one epoch: the update sees the rollout policy itself, so the ratio is exactly 1
    assert stats["ppo/policy/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert stats["ppo/policy/clipfrac"] == 0.0
    assert stats["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert stats["env/reward_mean"] == pytest.approx(1.5) and stats["ppo/mean_scores"] == pytest.approx(1.5)
    # whitened advantages have mean 0, so the unclipped policy loss -mean(A * ratio) is 0
    assert stats["ppo/loss/policy"] == pytest.approx(0.0, abs=1e-5)
    # adaptive controller: value *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon
    assert trainer.kl_ctl.value == pytest.approx(0.2 * (1 - 0.2 * 4 / 10000))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    second = trainer.step(*fixed_batch())
    assert second["objective/kl"] != 0.0  # the policy moved away from the reference


def test_step_api_ratio_threshold_skips_the_update():
    from alignctl.api import PPOTrainer

    model, tokenizer = tiny_policy()
    trainer = PPOTrainer(model=model, tokenizer=tokenizer, batch_size=4, mini_batch_size=2, ppo_epochs=1,
                         ratio_threshold=1e-3, learning_rate=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = trainer.step(*fixed_batch())
    assert stats["ppo/skipped_minibatches"] == 2.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_step_api_refuses_bad_input():
    from alignctl.api import PPOTrainer
    from alignctl.errors import ConfigError

    model, tokenizer = tiny_policy()
    with pytest.raises(ConfigError, match="did you mean mini_batch_size"):
        PPOTrainer(model=model, tokenizer=tokenizer, mini_batchsize=2)
    with pytest.raises(ConfigError, match="multiple of algo.mini_batch_size"):
        PPOTrainer(model=model, tokenizer=tokenizer, batch_size=6, mini_batch_size=4)
    trainer = PPOTrainer(model=model, tokenizer=tokenizer, batch_size=4, mini_batch_size=2)
    queries, responses, scores = fixed_batch()
    with pytest.raises(ConfigError, match="batch_size is 4"):
        trainer.step(queries[:3], responses[:3], scores[:3])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["reward=none"], "needs a reward"),
        (["reward=model"], "reward=model needs reward.model="),
        (["train.per_device_batch_size=4"], "train.per_device_batch_size is not used by algo=ppo; use algo.batch_size"),
        (["dataset.eval_fraction=0.2"], "does not evaluate on held-out prompts"),
        (["algo.kl_penalty=kl2"], "algo.kl_penalty='kl2': use one of kl, k1, abs, mse, k3, full"),
        (["algo.batch_size=6"], "multiple of algo.mini_batch_size"),
        (["generation.top_p=1.5"], "generation.top_p=1.5"),
        (["reward.functions=[nope_module:fn]"], "cannot import module"),
        (["reward=model", "reward.model=/nonexistent/rm"], "reward.model=/nonexistent/rm"),
    ],
)
def test_bad_ppo_settings_are_one_clear_line(tmp_path, overrides, message, capsys):
    assert main(RUN + overrides + [f"run.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()), err


def test_offline_algorithms_refuse_online_settings(tmp_path, capsys):
    assert main(["train", "recipe=smoke/sft", "reward=length", f"run.output_dir={tmp_path}"]) == 2
    assert "reward is used by online algorithms" in capsys.readouterr().err
    # with sample generations off nothing reads the generation group (on, sft's samples use it)
    assert main(["train", "recipe=smoke/sft", "generation.max_new_tokens=8", "run.sample_prompts=0",
                 f"run.output_dir={tmp_path}"]) == 2
    assert "generation.max_new_tokens is used by online algorithms" in capsys.readouterr().err


def test_full_kl_lora_and_k3_run(tmp_path):
    for extra in (["algo.kl_penalty=full"], ["algo.kl_penalty=k3", "peft=lora"]):
        out = tmp_path / extra[-1].replace("=", "-")
        assert main(RUN + ["train.max_steps=2", "algo.sample_every=0", *extra, f"run.output_dir={out}"]) == 0
        assert read_metrics(out)[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)


def test_ddp_on_two_cpu_processes_runs(tmp_path):
    result = run_cli(*RUN, "train.max_steps=3", "algo.batch_size=4", "algo.sample_every=0", "launcher=ddp",
                     "launcher.num_processes=2", "launcher.main_process_port=0", f"run.output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stderr.count("alignctl run summary") == 1
    assert "8 prompts per step (2 process(es))" in result.stderr
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert (tmp_path / "final_model" / "value_head.safetensors").is_file()


def test_reward_model_and_value_model_from_a_trained_reward_run(tmp_path):
    rm_dir = tmp_path / "rm"
    assert main(["train", "recipe=smoke/reward", "train.max_steps=2", "run.progress=false", f"run.output_dir={rm_dir}"]) == 0
    out = tmp_path / "ppo"
    args = RUN + ["train.max_steps=2", "algo.sample_every=0", "reward=model", f"reward.model={rm_dir}",
                  f"algo.value_model={rm_dir}", f"run.output_dir={out}"]
    assert main(args) == 0
    first = read_metrics(out)[0]
    assert "env/reward/reward_model" in first and first["env/reward_mean"] == first["env/reward/reward_model"]
    assert (out / "final_model" / "value_model" / "config.json").is_file()
    # the reward model and a function together, weighted
    both = tmp_path / "both"
    assert main(RUN + ["train.max_steps=1", "algo.sample_every=0", "reward=model", f"reward.model={rm_dir}",
                       "reward.functions=[alignctl.rl.reward_functions:length_target]", "reward.weights=[0.5,2.0]",
                       f"run.output_dir={both}"]) == 0
    record = read_metrics(both)[0]
    expected = 0.5 * record["env/reward/reward_model"] + 2.0 * record["env/reward/length_target"]
    assert record["env/reward_mean"] == pytest.approx(expected, rel=1e-5)
