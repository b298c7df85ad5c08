"""DDPO: the step log-probability, the clipped loss and the stat tracker by hand; the tiny
pipeline's sampling; the CLI end to end on recipe=smoke/ddpo."""

import math

import numpy as np
import pytest
import torch

from alignctl.losses.ddpo import PerPromptStatTracker, ddim_step_with_logprob, ddpo_loss, whiten_rewards


def _alphas():
    return torch.linspace(0.99, 0.01, 1000)  # any decreasing alphas_cumprod


def test_ddim_step_logprob_by_hand():
    ac = _alphas()
    x = torch.tensor([[0.5, -1.0]])
    eps = torch.tensor([[0.2, 0.4]])
    nxt = torch.tensor([[0.3, -0.7]])
    t, T, n, eta = 600, 1000, 10, 1.0
    out = ddim_step_with_logprob(eps, torch.tensor([t]), x, ac, T, n, eta=eta, prev_sample=nxt)
    a_t, a_p = ac[t].item(), ac[t - 100].item()
    x0 = [(xi - math.sqrt(1 - a_t) * ei) / math.sqrt(a_t) for xi, ei in zip([0.5, -1.0], [0.2, 0.4])]
    var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
    std = eta * math.sqrt(var)
    mu = [math.sqrt(a_p) * x0i + math.sqrt(1 - a_p - std**2) * ei for x0i, ei in zip(x0, [0.2, 0.4])]
    lp = [-(ni - mi) ** 2 / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi) for ni, mi in zip([0.3, -0.7], mu)]
    assert out.prev_sample_mean[0].tolist() == pytest.approx(mu, rel=1e-5)
    assert out.log_prob.item() == pytest.approx(sum(lp) / 2, rel=1e-5)
    assert out.std_dev_t[0, 0].item() == pytest.approx(std, rel=1e-5)


def test_ddim_step_mean_matches_the_scheduler():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)  # as SD 1.x
    sched.set_timesteps(20)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    eps = torch.randn(2, 4, 8, 8, generator=gen)
    for t in (sched.timesteps[0], sched.timesteps[10], sched.timesteps[-1]):
        ref = sched.step(eps, t, x, eta=0.7, variance_noise=torch.zeros_like(x)).prev_sample
        ours = ddim_step_with_logprob(eps, torch.full((2,), int(t)), x, sched.alphas_cumprod, 1000, 20, eta=0.7)
        torch.testing.assert_close(ours.prev_sample_mean, ref, rtol=1e-5, atol=1e-5)
        # sampling then scoring its own sample: the log-prob of mean + std*z is that of z
        z = ours.prev_sample - ours.prev_sample_mean
        again = ddim_step_with_logprob(eps, torch.full((2,), int(t)), x, sched.alphas_cumprod, 1000, 20, eta=0.7,
                                       prev_sample=ours.prev_sample)
        expected = (-(z**2) / (2 * ours.std_dev_t**2) - ours.std_dev_t.log() - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2, 3))
        torch.testing.assert_close(again.log_prob, expected, rtol=1e-4, atol=1e-4)


def test_ddim_step_refuses_eta_zero():
    with pytest.raises(ValueError):
        ddim_step_with_logprob(torch.zeros(1, 2), torch.tensor([500]), torch.zeros(1, 2), _alphas(), 1000, 10, eta=0.0)


def test_ddpo_loss_clips_advantages_and_ratio():
    lp = torch.tensor([0.0, 0.1, -0.1, 0.0])
    old = torch.tensor([0.0, 0.0, 0.0, 0.0])
    adv = torch.tensor([10.0, 1.0, -1.0, -7.0])
    out = ddpo_loss(lp, old, adv, clip_range=0.05, adv_clip_max=5.0)
    r = [1.0, math.exp(0.1), math.exp(-0.1), 1.0]
    a = [5.0, 1.0, -1.0, -5.0]
    terms = [max(-ai * ri, -ai * min(max(ri, 0.95), 1.05)) for ai, ri in zip(a, r)]
    assert out.loss.item() == pytest.approx(sum(terms) / 4, abs=1e-6)
    assert out.approx_kl.item() == pytest.approx(0.5 * (0.01 + 0.01) / 4, rel=1e-6)
    assert out.clipfrac.item() == pytest.approx(0.5)


def test_whiten_and_per_prompt_stat_tracker():
    r = np.array([1.0, 2.0, 3.0, 6.0])
    np.testing.assert_allclose(whiten_rewards(r), (r - 3.0) / (np.std(r) + 1e-8))
    tracker = PerPromptStatTracker(buffer_size=3, min_count=2)
    # first batch: "a" has 2 rewards (own stats), "b" has 1 (< min_count: batch stats)
    adv = tracker.update(["a", "b", "a"], [1.0, 4.0, 3.0])
    batch_mean, batch_std = np.mean([1, 4, 3]), np.std([1, 4, 3]) + 1e-6
    np.testing.assert_allclose(adv, [(1 - 2) / (1 + 1e-6), (4 - batch_mean) / batch_std, (3 - 2) / (1 + 1e-6)])
    # second batch: buffer of "a" keeps its last 3 rewards: [3, 5, 7]... ([1, 3] + [5, 7] -> [3, 5, 7])
    adv = tracker.update(["a", "a", "b"], [5.0, 7.0, 2.0])
    a_buf = [3.0, 5.0, 7.0]
    b_buf = [4.0, 2.0]
    np.testing.assert_allclose(adv[:2], [(5 - np.mean(a_buf)) / (np.std(a_buf) + 1e-6), (7 - 5) / (np.std(a_buf) + 1e-6)])
    np.testing.assert_allclose(adv[2], (2 - np.mean(b_buf)) / (np.std(b_buf) + 1e-6))
    restored = PerPromptStatTracker(3, 2)
    restored.load_state_dict(tracker.state_dict())
    assert restored.get_stats() == tracker.get_stats()


# ---------------------------------------------------------------------------------------- end to end
QUIET = ["run.progress=false"]


def _train(tmp_path, *extra, name="run"):
    from alignctl.cli import main
    from alignctl.tracking import read_metrics

    out = tmp_path / name
    assert main(["train", "recipe=smoke/ddpo", *QUIET, *extra, f"run.output_dir={out}"]) == 0
    return out, [r for r in read_metrics(out) if r["split"] == "train"]


def test_tiny_pipeline_sampling_records_the_trajectory():
    from alignctl.models.diffusion import DiffusionPolicy, build_tiny_pipeline
    from alignctl.rollout.diffusion import sample_with_logprob

    policy = DiffusionPolicy(build_tiny_pipeline(0))
    emb, neg = policy.encode_prompts(["cat", "dog"]), policy.encode_prompts([""]).expand(2, -1, -1)
    torch.manual_seed(0)
    traj = sample_with_logprob(policy, emb, neg, num_steps=3, eta=1.0, guidance_scale=3.0, latent_size=16)
    assert traj.latents.shape == (2, 3, 4, 16, 16) and traj.log_probs.shape == (2, 3)
    torch.testing.assert_close(traj.latents[:, 1:], traj.next_latents[:, :-1])
    assert torch.isfinite(traj.log_probs).all()
    assert policy.decode(traj.final_latents).shape == (2, 3, 32, 32)


def test_cli_smoke_ddpo_logs_metrics_and_saves_a_loadable_pipeline(tmp_path, one_thread):
    out, records = _train(tmp_path, "train.max_steps=2")
    assert len(records) == 2
    expected = {"loss", "reward_mean", "reward_std", "rewards/jpeg_compressibility/mean", "approx_kl", "clipfrac",
                "images_per_s", "time/sample", "time/reward", "time/update"}
    assert expected <= set(records[0])
    assert records[0]["approx_kl"] == pytest.approx(0.0, abs=1e-6)  # first update: ratio 1 (same weights)
    assert (out / "samples" / "step-0000002.png").exists()
    final = out / "final_model"
    assert (final / "pytorch_lora_weights.safetensors").exists()
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(final, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(final)
    image = pipe("cat", num_inference_steps=2, height=32, width=32, output_type="pt").images
    assert image.shape == (1, 3, 32, 32)


def test_full_unet_and_per_prompt_tracking(tmp_path, one_thread):
    out, records = _train(tmp_path, "train.max_steps=1", "algo.use_lora=false", "algo.per_prompt_stat_tracking=true",
                          "algo.per_prompt_stat_tracking_min_count=1", "algo.train_cfg=false",
                          "algo.train_timestep_fraction=0.5", "algo.train_num_inner_epochs=2")
    assert (out / "final_model" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert np.isfinite(records[0]["loss"])


def test_bad_settings_are_refused(tmp_path):
    from alignctl.cli import main

    for bad in ("algo.sample_eta=0", "algo.train_batch_size=3", "train.per_device_batch_size=4", "reward=none"):
        assert main(["train", "recipe=smoke/ddpo", *QUIET, bad, f"run.output_dir={tmp_path / 'x'}"]) != 0
        assert not (tmp_path / "x" / "final_model").exists()


def test_sigkill_then_resume_logs_exactly_the_uninterrupted_numbers(tmp_path, one_thread):
    from alignctl.cli import main
    from alignctl.tracking import read_metrics
    from test_resume_faults import kill_at_checkpoint_then_resume

    args = ["train", "recipe=smoke/ddpo", "train.max_steps=24", "train.save_steps=2",
            "algo.per_prompt_stat_tracking=true", "algo.per_prompt_stat_tracking_min_count=2", *QUIET]
    assert main(args + [f"run.output_dir={tmp_path / 'whole'}"]) == 0
    killed = tmp_path / "killed"
    kill_at_checkpoint_then_resume(args, killed, "step-0000002")

    def numbers(run_dir):
        return [(r["step"], r["loss"], r["reward_mean"], r["advantages/abs_mean"])
                for r in read_metrics(run_dir) if r["split"] == "train"]

    assert numbers(killed) == numbers(tmp_path / "whole")


# ---------------------------------------------------------------------------------------- async rewards, prompts, TensorBoard
def test_async_reward_computation_gives_the_synchronous_numbers(tmp_path, one_thread, monkeypatch):
    import concurrent.futures

    submitted = []
    real_submit = concurrent.futures.ThreadPoolExecutor.submit
    monkeypatch.setattr(concurrent.futures.ThreadPoolExecutor, "submit",
                        lambda self, *a, **k: submitted.append(1) or real_submit(self, *a, **k))

    def numbers(records):
        return [{k: v for k, v in r.items() if not k.startswith("time/") and not k.endswith("_per_s") and k != "timestamp"} for r in records]

    _, sync = _train(tmp_path, "train.max_steps=1", name="sync")
    _, asyn = _train(tmp_path, "train.max_steps=1", "algo.async_reward_computation=true", "algo.max_workers=2",
                     name="async")
    assert len(submitted) == 2  # one per sampling batch (smoke: 2 batches of 2 images)
    assert numbers(asyn) == numbers(sync)


def prompts_with_metadata():
    """A prompt_fn for the tests: (prompt, metadata) pairs."""
    return [("cat", {"score": 1.0}), ("dog", {"score": 3.0})]


def reward_from_metadata(images, prompts, score, **columns):
    """A reward that returns the prompt's metadata `score`: the metadata reached the reward."""
    return list(score)


def _prompt_job(tmp_path, **algo):
    from omegaconf import OmegaConf

    base = {"prompts": [], "prompt_fn": None}
    return OmegaConf.create({"algo": {**base, **algo}, "train": {"seed": 0},
                             "dataset": {"path": str(tmp_path / "none.jsonl"), "skip_invalid": False, "max_rows": None}})


def test_prompt_sources_list_text_file_and_function(tmp_path):
    from alignctl.algos.ddpo import DDPOAlgorithm, _collate

    algo = DDPOAlgorithm.__new__(DDPOAlgorithm)
    data = algo.prepare_data(_prompt_job(tmp_path, prompts=["a red cat", "a dog"]))
    assert [e["prompt"] for e in data.train] == ["a red cat", "a dog"]

    text = tmp_path / "prompts.txt"
    text.write_text("a cat\n\n  a horse  \n\n", encoding="utf-8")
    job = _prompt_job(tmp_path)
    job.dataset.path = str(text)
    assert [e["prompt"] for e in algo.prepare_data(job).train] == ["a cat", "a horse"]

    data = algo.prepare_data(_prompt_job(tmp_path, prompt_fn="test_ddpo:prompts_with_metadata"))
    batch = _collate(data.train)
    assert batch["prompts"] == ["cat", "dog"] and batch["columns"] == {"score": [1.0, 3.0]}


def bad_prompt_fn_raises():
    raise RuntimeError("no prompts today")


def bad_prompt_fn_shape():
    return [("cat", "not a dict")]


def test_prompt_fn_errors_name_the_setting(tmp_path):
    from alignctl.algos.ddpo import DDPOAlgorithm, check_ddpo_config
    from alignctl.errors import ConfigError

    algo = DDPOAlgorithm.__new__(DDPOAlgorithm)
    for dotted in ("no_such_module_xyz:f", "test_ddpo:missing", "test_ddpo:bad_prompt_fn_raises",
                   "test_ddpo:bad_prompt_fn_shape"):
        with pytest.raises(ConfigError, match="algo.prompt_fn"):
            algo.prepare_data(_prompt_job(tmp_path, prompt_fn=dotted))
    from alignctl.algo_configs import DDPOConfig
    from omegaconf import OmegaConf

    both = OmegaConf.structured(DDPOConfig(prompts=["cat"], prompt_fn="test_ddpo:prompts_with_metadata"))
    with pytest.raises(ConfigError, match="set one of them"):
        check_ddpo_config(both)


def test_cli_prompt_fn_metadata_reaches_the_reward(tmp_path, one_thread):
    _, records = _train(tmp_path, "train.max_steps=1", "algo.prompt_fn=test_ddpo:prompts_with_metadata",
                        "reward.functions=[test_ddpo:reward_from_metadata]", "reward.weights=null")
    # 4 images from the prompts cat (score 1) and dog (score 3)
    assert min(abs(records[0]["reward_mean"] - m) for m in (1.0, 1.5, 2.0, 2.5, 3.0)) < 1e-6
    _, records = _train(tmp_path, "train.max_steps=1", "algo.prompts=[a cat,a dog]", name="list")
    assert np.isfinite(records[0]["reward_mean"])


def test_tensorboard_gets_the_sample_grid(tmp_path, one_thread):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from alignctl.tracking import RunTracker

    RunTracker(tmp_path, 1, enabled=False, progress=False, report_to=["tensorboard"]).log_image(
        "x", np.zeros((2, 2, 3), np.uint8), 1)  # off on other processes: no writer, no error
    out, _ = _train(tmp_path, "train.max_steps=1", "run.tensorboard=true")
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert "samples" in events.Tags()["images"]
    image = events.Images("samples")[0]
    assert image.step == 1 and image.width > 0
