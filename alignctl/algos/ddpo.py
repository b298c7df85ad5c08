"""DDPO on the online loop: sample images with a DDIM trajectory, score them, clipped updates
over the denoising steps (Black et al. 2023; the reference library's DDPOTrainer).

One alignctl step is one reference epoch: ``sample_num_batches_per_epoch`` batches of
``sample_batch_size`` prompts are sampled (``rollout.diffusion.sample_with_logprob``), scored by
the image reward functions (``rl.image_rewards``), turned into advantages (per-prompt stat
tracking or batch whitening, ``losses.ddpo``), then ``train_num_inner_epochs`` passes: samples
shuffled, each sample's denoising steps in its own random order, ``int(sample_num_steps *
train_timestep_fraction)`` of them trained, one optimizer step per
``train_gradient_accumulation_steps`` x trained-steps micro-batches (as the reference).
"""

from __future__ import annotations

import importlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from omegaconf import DictConfig

from alignctl.engine.online import OnlineData, run_online
from alignctl.engine.run import RunResult
from alignctl.errors import ConfigError
from alignctl.losses.ddpo import PerPromptStatTracker, ddim_step_with_logprob, ddpo_loss, num_train_timesteps, whiten_rewards

UNUSED_TRAIN_FIELDS = {
    "per_device_batch_size": "algo.sample_batch_size and algo.train_batch_size",
    "gradient_accumulation_steps": "algo.train_gradient_accumulation_steps",
    "per_device_eval_batch_size": None,
    "eval_steps": None,
    "group_by_length": None,
}


def check_ddpo_config(cfg) -> None:
    def bad(name: str, why: str) -> ConfigError:
        return ConfigError(f"algo.{name}={getattr(cfg, name)!r}: {why}")

    for name in ("sample_num_steps", "sample_batch_size", "sample_num_batches_per_epoch", "train_batch_size",
                 "train_gradient_accumulation_steps", "train_num_inner_epochs", "lora_rank",
                 "per_prompt_stat_tracking_buffer_size", "per_prompt_stat_tracking_min_count", "max_workers"):
        if getattr(cfg, name) < 1:
            raise bad(name, "must be >= 1")
    if not cfg.sample_eta > 0:
        raise bad("sample_eta", "must be > 0 (with eta = 0 a DDIM step is deterministic and has no log-probability)")
    if not 0 < cfg.train_timestep_fraction <= 1:
        raise bad("train_timestep_fraction", "must be in (0, 1]")
    if num_train_timesteps(cfg.sample_num_steps, cfg.train_timestep_fraction) < 1:
        raise bad("train_timestep_fraction", "trains no step: sample_num_steps x train_timestep_fraction must be >= 1")
    if not cfg.train_clip_range > 0:
        raise bad("train_clip_range", "must be > 0")
    if not cfg.train_adv_clip_max > 0:
        raise bad("train_adv_clip_max", "must be > 0")
    if cfg.sample_guidance_scale < 1:
        raise bad("sample_guidance_scale", "must be >= 1 (1 = no classifier-free guidance)")
    if cfg.resolution is not None and cfg.resolution % 8:
        raise bad("resolution", "must be a multiple of 8")
    images = cfg.sample_batch_size * cfg.sample_num_batches_per_epoch
    if images % cfg.train_batch_size:
        raise ConfigError(f"algo.sample_batch_size x algo.sample_num_batches_per_epoch = {images} images must be a "
                          f"multiple of algo.train_batch_size = {cfg.train_batch_size}")
    if cfg.prompts and cfg.prompt_fn:
        raise ConfigError("algo.prompts and algo.prompt_fn are two prompt sources: set one of them")
    for i, prompt in enumerate(cfg.prompts):
        if not isinstance(prompt, str) or not prompt:
            raise ConfigError(f"algo.prompts[{i}]={prompt!r}: each prompt must be a non-empty string")
    if cfg.prompt_fn:
        _import_prompt_fn(cfg.prompt_fn)


def _import_prompt_fn(dotted: str):
    module_name, _, attr = dotted.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # ImportError, AttributeError, errors raised while importing the module
        raise ConfigError(f"algo.prompt_fn={dotted!r} cannot be imported (module:function): "
                          f"{type(exc).__name__}: {exc}") from None
    if not callable(fn):
        raise ConfigError(f"algo.prompt_fn={dotted!r} is not a function")
    return fn


def _call_prompt_fn(dotted: str) -> List[Tuple[str, Dict[str, Any]]]:
    """The (prompt, metadata) pairs of the user's prompt function; any failure is one ConfigError."""
    fn = _import_prompt_fn(dotted)
    try:
        result = fn()
    except Exception as exc:
        raise ConfigError(f"algo.prompt_fn={dotted!r} failed: {type(exc).__name__}: {exc}") from None
    shape = "must return a non-empty list of prompt strings or of (prompt, metadata dict) pairs"
    if isinstance(result, (str, bytes, dict)) or not hasattr(result, "__iter__"):
        raise ConfigError(f"algo.prompt_fn={dotted!r} returned {type(result).__name__}: {shape}")
    pairs = []
    for i, item in enumerate(result):
        if isinstance(item, str):
            prompt, meta = item, {}
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], dict):
            prompt, meta = item
        else:
            raise ConfigError(f"algo.prompt_fn={dotted!r}: item {i} is {item!r}: {shape}")
        if not isinstance(prompt, str) or not prompt:
            raise ConfigError(f"algo.prompt_fn={dotted!r}: item {i} has prompt {prompt!r}: prompts must be non-empty strings")
        if "prompt" in meta:
            raise ConfigError(f"algo.prompt_fn={dotted!r}: item {i}'s metadata has a `prompt` key: drop it")
        pairs.append((prompt, dict(meta)))
    if not pairs:
        raise ConfigError(f"algo.prompt_fn={dotted!r} returned no prompts: {shape}")
    return pairs


def _is_text_file(path: Optional[str]) -> bool:
    return isinstance(path, str) and path.lower().endswith(".txt")


def validate_job(job: DictConfig) -> None:
    from alignctl.algos.online_base import refuse_unused_train_fields
    from alignctl.config import GenerationConfig
    from alignctl.rl.image_rewards import ImageRewards

    check_ddpo_config(job.algo)
    refuse_unused_train_fields(job, UNUSED_TRAIN_FIELDS)
    gen_defaults = GenerationConfig()
    for key in job.generation:
        if job.generation[key] != getattr(gen_defaults, key):
            raise ConfigError(f"generation.{key} is not used by algo=ddpo (sampling is algo.sample_*): drop it")
    if (job.algo.prompts or job.algo.prompt_fn) and _is_text_file(job.dataset.get("path")):
        which = "algo.prompts" if job.algo.prompts else "algo.prompt_fn"
        raise ConfigError(f"{which} replaces the dataset: drop dataset.path={job.dataset.path} (or {which})")
    if job.dataset.eval_split or job.dataset.eval_fraction:
        raise ConfigError("algo=ddpo does not evaluate on held-out prompts; set dataset.eval_fraction=0 and dataset.eval_split=null")
    if job.reward.model:
        raise ConfigError("algo=ddpo scores images with reward.functions only (reward.model is a text reward model)")
    if job.peft.method not in ("none", "lora"):
        raise ConfigError(f"peft={job.peft.method} is not supported by algo=ddpo: use algo.use_lora (LoRA on the UNet)")
    if job.peft.method == "lora" and not job.algo.use_lora:
        raise ConfigError("peft=lora with algo.use_lora=false: drop one of them")
    if job.peft.merge_on_save:
        raise ConfigError("peft.merge_on_save is not supported by algo=ddpo (the LoRA file loads with load_lora_weights)")
    ImageRewards(list(job.reward.functions), job.reward.weights)


def _collate(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    keys = list(dict.fromkeys(k for r in rows for k in r["columns"]))  # every row's metadata keys (None where absent)
    return {
        "prompts": [r["prompt"] for r in rows],
        "columns": {k: [r["columns"].get(k) for r in rows] for k in keys},
        "row_index": torch.tensor([r["index"] for r in rows]),
    }


class DDPOAlgorithm:
    unit = "images"

    def __init__(self, job: DictConfig) -> None:
        self.cfg = job.algo
        self.job = job
        self._pending_state: Optional[Dict[str, Any]] = None
        self.trained_steps = num_train_timesteps(self.cfg.sample_num_steps, self.cfg.train_timestep_fraction)

    # ------------------------------------------------------------------ what the loop asks
    def rollout_batch_size(self, job: DictConfig) -> int:
        return job.algo.sample_batch_size * job.algo.sample_num_batches_per_epoch

    def accumulation_steps(self, job: DictConfig) -> int:
        return job.algo.train_gradient_accumulation_steps * self.trained_steps

    def prepare_data(self, job: DictConfig) -> OnlineData:
        """The prompts: algo.prompts, else algo.prompt_fn, else a .txt file (one prompt per non-empty
        line), else the dataset's rows (`prompt` column; the other columns are metadata)."""
        from alignctl.data.load import load_rows
        from alignctl.errors import DataError

        algo = job.algo
        if algo.get("prompts") or algo.get("prompt_fn"):
            if algo.get("prompts"):
                pairs, source = [(str(p), {}) for p in algo.prompts], "algo.prompts"
            else:
                pairs, source = _call_prompt_fn(algo.prompt_fn), f"algo.prompt_fn={algo.prompt_fn}"
            return self._online_data(pairs, source)
        if _is_text_file(job.dataset.path):
            from pathlib import Path

            path = Path(job.dataset.path).expanduser()
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise DataError(f"dataset.path={job.dataset.path}: cannot read the prompt file: {exc}") from None
            pairs = [(line.strip(), {}) for line in text.splitlines() if line.strip()]
            if job.dataset.get("max_rows") is not None:
                pairs = pairs[: job.dataset.max_rows]
            if not pairs:
                raise DataError(f"dataset.path={job.dataset.path}: no prompts (one prompt per non-empty line)")
            return self._online_data(pairs, str(path))

        raw = load_rows(job.dataset, seed=job.train.seed, hold_out=False)
        examples = []
        for row in raw.train:
            i, data = row.index, row.data
            prompt = data.get("prompt")
            if not isinstance(prompt, str) or not prompt:
                if job.dataset.skip_invalid:
                    continue
                from alignctl.data.load import SKIP_HINT

                line = f" (line {row.line})" if row.line is not None else ""
                raise DataError(
                    f"{raw.source}: row {i}{line}: algo=ddpo needs a non-empty `prompt` string; {SKIP_HINT}"
                )
            examples.append({"prompt": prompt, "columns": {k: v for k, v in data.items() if k != "prompt"}, "index": i})
        return OnlineData(train=examples, collate=_collate,
                          notes=[("data", f"{raw.source} ({len(examples)} prompts)")], processors=[])

    @staticmethod
    def _online_data(pairs: List[Tuple[str, Dict[str, Any]]], source: str) -> OnlineData:
        examples = [{"prompt": p, "columns": meta, "index": i} for i, (p, meta) in enumerate(pairs)]
        return OnlineData(train=examples, collate=_collate,
                          notes=[("data", f"{source} ({len(examples)} prompts)")], processors=[])

    def build_model(self, job: DictConfig) -> torch.nn.Module:
        from alignctl.models.diffusion import LORA_TARGETS, DiffusionPolicy, load_pipeline

        pipeline = load_pipeline(job.model.name_or_path, job.model.revision, seed=self.cfg.init_seed)
        lora = None
        if self.cfg.use_lora:
            if job.peft.method == "lora":
                targets = list(job.peft.target_modules)
                targets = LORA_TARGETS if targets == ["all-linear"] else targets
                lora = {"r": job.peft.r, "alpha": job.peft.alpha, "targets": targets}
            else:
                lora = {"r": self.cfg.lora_rank, "alpha": self.cfg.lora_rank, "targets": LORA_TARGETS}
        return DiffusionPolicy(pipeline, lora=lora)

    def setup(self, job: DictConfig, loop) -> None:
        from alignctl.rl.image_rewards import ImageRewards

        self.loop = loop
        self.rewards = ImageRewards(list(job.reward.functions), job.reward.weights)
        self.tracker = PerPromptStatTracker(self.cfg.per_prompt_stat_tracking_buffer_size,
                                            self.cfg.per_prompt_stat_tracking_min_count)
        if self._pending_state is not None:
            self.tracker.load_state_dict(self._pending_state.get("tracker", {}))
        policy = loop.accelerator.unwrap_model(loop.model)
        vae_scale = 2 ** (len(policy.vae.config.block_out_channels) - 1)
        resolution = self.cfg.resolution or policy.unet.config.sample_size * vae_scale
        self.latent_size = resolution // vae_scale

    # ------------------------------------------------------------------ one step
    def iteration(self, batch: Dict[str, Any], loop) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], torch.Tensor]:
        from alignctl.rollout.diffusion import sample_with_logprob

        cfg, accelerator = self.cfg, loop.accelerator
        policy = accelerator.unwrap_model(loop.model)
        device = accelerator.device
        prompts, columns = batch["prompts"], batch["columns"]
        n = len(prompts)

        # async_reward_computation: each batch is scored in a worker thread as soon as it is decoded,
        # while the next batch samples; the results are gathered in order below.
        executor = ThreadPoolExecutor(cfg.max_workers) if cfg.get("async_reward_computation") else None
        futures = []
        start = time.perf_counter()
        trajs, embeds, images = [], [], []
        try:
            negative = policy.encode_prompts([cfg.negative_prompts])
            for first in range(0, n, cfg.sample_batch_size):
                chunk = prompts[first : first + cfg.sample_batch_size]
                with accelerator.autocast():
                    prompt_embeds = policy.encode_prompts(chunk)
                    neg = negative.expand(len(chunk), -1, -1)
                    traj = sample_with_logprob(policy, prompt_embeds, neg, cfg.sample_num_steps, cfg.sample_eta,
                                               cfg.sample_guidance_scale, self.latent_size)
                    images.append(policy.decode(traj.final_latents).detach().cpu())
                trajs.append(traj)
                embeds.append(prompt_embeds)
                if executor is not None:
                    part = {k: v[first : first + cfg.sample_batch_size] for k, v in columns.items()}
                    futures.append(executor.submit(self.rewards, images[-1], chunk, part))
            sample_s = time.perf_counter() - start

            start = time.perf_counter()
            images_t = torch.cat(images)
            if executor is not None:
                results = [f.result() for f in futures]
                rewards = torch.cat([r for r, _ in results])
                per_source = {name: torch.cat([s[name] for _, s in results]) for name in results[0][1]}
            else:
                rewards, per_source = self.rewards(images_t, prompts, columns)
            reward_s = time.perf_counter() - start
        finally:
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)

        # advantages over every process's images
        all_rewards = accelerator.gather(rewards.to(device)).cpu().numpy()
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            all_prompts = gather_object(list(prompts))
        else:
            all_prompts = list(prompts)
        if cfg.per_prompt_stat_tracking:
            all_adv = self.tracker.update(all_prompts, all_rewards)
        else:
            all_adv = whiten_rewards(all_rewards)
        me = accelerator.process_index
        advantages = torch.as_tensor(all_adv[me * n : (me + 1) * n], dtype=torch.float32, device=device)

        samples = {
            "latents": torch.cat([t.latents for t in trajs]),
            "next_latents": torch.cat([t.next_latents for t in trajs]),
            "log_probs": torch.cat([t.log_probs for t in trajs]).float(),
            "timesteps": torch.cat([t.timesteps for t in trajs]),
            "embeds": torch.cat(embeds),
            "advantages": advantages,
            "row_index": batch["row_index"],
        }
        start = time.perf_counter()
        losses, stats = self._update(loop, samples, negative)
        update_s = time.perf_counter() - start

        rewards_f = rewards.float()
        metrics = {
            "reward_mean": rewards_f.mean(),
            "reward_std": rewards_f.std() if n > 1 else torch.zeros(()),
            "env/reward_mean": torch.as_tensor(float(all_rewards.mean())),
            "advantages/abs_mean": advantages.abs().mean().cpu(),
            "time/sample": torch.tensor(sample_s), "time/reward": torch.tensor(reward_s),
            "time/update": torch.tensor(update_s),
        }
        for name, values in per_source.items():
            metrics[f"rewards/{name}/mean"] = values.float().mean()
        metrics.update({k: torch.stack(v).float().mean().cpu() for k, v in stats.items()})
        if accelerator.is_main_process:
            self._save_grid(loop, images_t, prompts, rewards.tolist())
        loss = torch.stack(losses).mean().cpu() if losses else torch.zeros(())
        return loss, metrics, torch.tensor(n)

    def _update(self, loop, samples: Dict[str, torch.Tensor], negative: torch.Tensor):
        from alignctl.engine.guards import loss_is_finite
        from alignctl.rollout.diffusion import guided, step_settings

        cfg, accelerator, model = self.cfg, loop.accelerator, loop.model
        policy = accelerator.unwrap_model(model)
        settings = step_settings(policy.pipeline.scheduler)
        n, steps = samples["log_probs"].shape
        losses: List[torch.Tensor] = []
        stats: Dict[str, List[torch.Tensor]] = {}
        for _ in range(cfg.train_num_inner_epochs):
            order = torch.randperm(n)
            shuffled = {k: v[order.to(v.device)] for k, v in samples.items()}
            perms = torch.stack([torch.randperm(steps) for _ in range(n)]).to(shuffled["log_probs"].device)
            rows = torch.arange(n, device=perms.device)[:, None]
            for key in ("latents", "next_latents", "log_probs", "timesteps"):
                shuffled[key] = shuffled[key][rows, perms]
            for first in range(0, n, cfg.train_batch_size):
                part = {k: v[first : first + cfg.train_batch_size] for k, v in shuffled.items()}
                b = part["embeds"].shape[0]
                embeds = torch.cat([negative.expand(b, -1, -1), part["embeds"]]) if cfg.train_cfg else part["embeds"]
                for j in range(self.trained_steps):
                    with accelerator.accumulate(model):
                        with accelerator.autocast():
                            latents, t = part["latents"][:, j], part["timesteps"][:, j]
                            if cfg.train_cfg:
                                noise_pred = guided(model(torch.cat([latents] * 2), torch.cat([t] * 2), embeds),
                                                    cfg.sample_guidance_scale)
                            else:
                                noise_pred = model(latents, t, embeds)
                            step = ddim_step_with_logprob(
                                noise_pred.float(), t, latents.float(), num_inference_steps=cfg.sample_num_steps,
                                eta=cfg.sample_eta, prev_sample=part["next_latents"][:, j].float(), **settings,
                            )
                            out = ddpo_loss(step.log_prob, part["log_probs"][:, j], part["advantages"],
                                            cfg.train_clip_range, cfg.train_adv_clip_max)
                        if not loss_is_finite(out.loss, accelerator):
                            loop.handle_nonfinite(out.loss, part["row_index"].tolist())
                            continue
                        accelerator.backward(out.loss)
                        max_norm = loop.tcfg.max_grad_norm
                        if accelerator.sync_gradients and max_norm > 0:
                            loop.window.grad_norm = accelerator.clip_grad_norm_(
                                [p for p in model.parameters() if p.requires_grad], max_norm)
                        loop.optimizer.step()
                        loop.optimizer.zero_grad(set_to_none=True)
                    losses.append(out.loss.detach())
                    stats.setdefault("approx_kl", []).append(out.approx_kl)
                    stats.setdefault("clipfrac", []).append(out.clipfrac)
        return losses, stats

    def _save_grid(self, loop, images: torch.Tensor, prompts: List[str], rewards: List[float]) -> None:
        """samples/step-NNNNNNN.png: the step's images in a row, each with its prompt and reward."""
        from PIL import Image, ImageDraw

        step = loop.progress.step + 1
        folder = loop.run_dir / "samples"
        folder.mkdir(exist_ok=True)
        pixels = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        size = max(pixels.shape[1], 64)
        grid = Image.new("RGB", (size * len(pixels), size + 24), "white")
        draw = ImageDraw.Draw(grid)
        for i, (img, prompt, reward) in enumerate(zip(pixels, prompts, rewards)):
            grid.paste(Image.fromarray(img).resize((size, size)), (i * size, 0))
            draw.text((i * size + 2, size + 1), f"{prompt[:10]}", fill="black")
            draw.text((i * size + 2, size + 12), f"{reward:.2f}", fill="black")
        grid.save(folder / f"step-{step:07d}.png")
        tracker = getattr(loop, "tracker", None)
        if tracker is not None and hasattr(tracker, "log_image"):
            tracker.log_image("samples", np.asarray(grid), step)

    # ------------------------------------------------------------------ saving and resume
    def unwrap_for_save(self, model: torch.nn.Module):
        from alignctl.models.diffusion import PipelineSaver

        return PipelineSaver(model, self.job.model.name_or_path, self.cfg.init_seed)

    def state_dict(self) -> Dict[str, Any]:
        return {"tracker": self.tracker.state_dict()} if hasattr(self, "tracker") else {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._pending_state = state
        if hasattr(self, "tracker"):
            self.tracker.load_state_dict(state.get("tracker", {}))


def run_ddpo(job: DictConfig) -> RunResult:
    validate_job(job)
    lora = "LoRA" if job.algo.use_lora else "full UNet"
    return run_online(job, DDPOAlgorithm(job), title=f"ddpo ({lora}, {job.algo.sample_num_steps} DDIM steps)")
