"""Algorithm registry: name -> (config schema, loss function, loop driver).

Adding an algorithm is one ``register(...)`` call here plus its config dataclass, loss module and
step/driver module. Loss and driver are dotted import paths, resolved on use, so ``alignctl list``
and config composition do not import torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict

from alignctl import algo_configs
from alignctl.errors import ConfigError


@dataclass(frozen=True)
class Algorithm:
    name: str
    config_cls: type
    # "module:attribute" of the loss function (pure tensor math).
    loss: str
    # "module:attribute" of the driver: a callable taking the composed JobConfig and running it.
    driver: str
    description: str
    # Which engine loop drives it: "offline" (epochs over a data set) or "online" (rollouts).
    loop: str = "offline"
    # "module:attribute" of a check of the composed job run before anything is written or launched.
    validate: str = ""
    # The rows it reads: "sft" (text, prompt/completion or messages), "pairs" (prompt/chosen/rejected),
    # "kto" (unpaired, labelled), "prompts" (online rollouts) or "images" (diffusion prompts).
    data: str = "pairs"
    # What it trains: "policy" (a causal LM), "reward_model" (a sequence classifier) or "diffusion".
    trains: str = "policy"
    # "module:Class" of the offline loop's algorithm (built from the algo section), for tools that
    # reuse its data preparation and loss outside training (``alignctl eval``).
    offline_steps: str = ""

    def load_loss(self) -> Callable[..., Any]:
        return _resolve(self.loss)

    def load_driver(self) -> Callable[..., Any]:
        return _resolve(self.driver)

    def build_offline(self, algo_cfg) -> Any:
        """The offline loop's algorithm object for this algo section."""
        if not self.offline_steps:
            raise ValueError(f"algorithm {self.name!r} has no offline steps")
        return _resolve(self.offline_steps)(algo_cfg)

    def check(self, job) -> None:
        """Refuse settings this algorithm would not read, then run its own checks."""
        if self.loop != "online":
            _refuse_online_groups(job, self.name)
        if self.validate:
            _resolve(self.validate)(job)


def _refuse_online_groups(job, name: str) -> None:
    """generation.* and reward.* are read by online algorithms only: a change is refused, not ignored."""
    from alignctl.config import GenerationConfig, RewardSourceConfig

    if job.reward != _defaults(RewardSourceConfig):
        raise ConfigError(
            f"reward is used by online algorithms only (ppo, grpo, rloo, iterative_sft, ddpo); algo={name} does not read it: drop the reward=/reward.* "
            "overrides"
        )
    from alignctl.engine.samples import sampling_enabled

    if sampling_enabled(job):  # the offline policy's sample generations read it
        return
    defaults = _defaults(GenerationConfig)
    for key in defaults:
        if job.generation[key] != defaults[key]:
            reads = "and by run.sample_prompts of sft, dpo, cpo, orpo, kto"
            raise ConfigError(
                f"generation.{key} is used by online algorithms (ppo, grpo, rloo, iterative_sft, ddpo) {reads}; "
                f"algo={name} does not read it{' with run.sample_prompts off' if name != 'reward' else ''}: drop it"
            )


def _defaults(schema: type):
    from omegaconf import OmegaConf

    return OmegaConf.structured(schema)


ALGORITHMS: Dict[str, Algorithm] = {}


def register(algorithm: Algorithm) -> None:
    if algorithm.name in ALGORITHMS:
        raise ValueError(f"algorithm {algorithm.name!r} is registered twice")
    ALGORITHMS[algorithm.name] = algorithm


def get_algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        valid = ", ".join(sorted(ALGORITHMS))
        raise ConfigError(f"unknown algorithm {name!r}; registered algorithms: {valid}") from None


def algorithms_where(**facts: Any) -> list:
    """Registered names whose fields equal ``facts`` (e.g. ``loop="offline", trains="policy"``), in
    registration order."""
    return [a.name for a in ALGORITHMS.values() if all(getattr(a, k) == v for k, v in facts.items())]


def _resolve(dotted: str) -> Callable[..., Any]:
    module_name, _, attr = dotted.partition(":")
    return getattr(importlib.import_module(module_name), attr)


register(
    Algorithm(
        name="sft",
        config_cls=algo_configs.SFTConfig,
        loss="alignctl.models.logps:token_nll",
        driver="alignctl.algos.sft:run_sft",
        description="supervised fine-tuning (text, prompt/completion, chat messages; packing, NEFTune)",
        data="sft",
        offline_steps="alignctl.algos.sft:SFTAlgorithm",
    )
)

register(
    Algorithm(
        name="dpo",
        config_cls=algo_configs.DPOConfig,
        loss="alignctl.losses.dpo:dpo_loss",
        driver="alignctl.algos.dpo:run_dpo",
        description="direct preference optimisation, every loss variant (sigmoid, ipo, hinge, robust, ...)",
        offline_steps="alignctl.algos.dpo:DPOAlgorithm",
    )
)

register(
    Algorithm(
        name="reward",
        config_cls=algo_configs.RewardConfig,
        loss="alignctl.losses.reward:reward_loss",
        driver="alignctl.algos.reward:run_reward",
        description="reward model: one-output sequence classifier on preference pairs (Bradley-Terry)",
        trains="reward_model",
        offline_steps="alignctl.algos.reward:RewardAlgorithm",
    )
)

register(
    Algorithm(
        name="cpo",
        config_cls=algo_configs.CPOConfig,
        loss="alignctl.losses.cpo:cpo_loss",
        driver="alignctl.algos.reference_free:run_cpo",
        description="contrastive preference optimisation, reference-free (sigmoid, hinge, ipo, simpo)",
        offline_steps="alignctl.algos.reference_free:CPOAlgorithm",
    )
)
register(
    Algorithm(
        name="orpo",
        config_cls=algo_configs.ORPOConfig,
        loss="alignctl.losses.orpo:odds_ratio_loss",
        driver="alignctl.algos.reference_free:run_orpo",
        description="odds-ratio preference optimisation: NLL on chosen + beta * odds-ratio term, no reference",
        offline_steps="alignctl.algos.reference_free:ORPOAlgorithm",
    )
)
register(
    Algorithm(
        name="kto",
        config_cls=algo_configs.KTOConfig,
        loss="alignctl.losses.kto:kto_loss",
        driver="alignctl.algos.kto:run_kto",
        description="Kahneman-Tversky optimisation on unpaired (or converted paired) good/bad examples",
        data="kto",
        offline_steps="alignctl.algos.kto:KTOAlgorithm",
    )
)
register(
    Algorithm(
        name="ppo",
        config_cls=algo_configs.PPOConfig,
        loss="alignctl.losses.ppo:ppo_loss",
        driver="alignctl.algos.ppo:run_ppo",
        description="proximal policy optimisation with a value head, KL penalty to a reference, GAE (needs reward=...)",
        loop="online",
        validate="alignctl.algos.ppo:validate_job",
        data="prompts",
    )
)
register(
    Algorithm(
        name="grpo",
        config_cls=algo_configs.GRPOConfig,
        loss="alignctl.losses.grpo:grpo_loss",
        driver="alignctl.algos.grpo:run_grpo",
        description="group relative policy optimisation: groups of completions per prompt, no value model",
        loop="online",
        validate="alignctl.algos.grpo:validate_job",
        data="prompts",
    )
)
register(
    Algorithm(
        name="rloo",
        config_cls=algo_configs.RLOOConfig,
        loss="alignctl.losses.grpo:rloo_loss",
        driver="alignctl.algos.rloo:run_rloo",
        description="REINFORCE leave-one-out: k samples per prompt, the others' mean as baseline, KL in the reward",
        loop="online",
        validate="alignctl.algos.rloo:validate_job",
        data="prompts",
    )
)
register(
    Algorithm(
        name="iterative_sft",
        config_cls=algo_configs.IterativeSFTConfig,
        loss="alignctl.models.logps:token_nll",
        driver="alignctl.algos.iterative_sft:run_iterative_sft",
        description="expert iteration: sample, keep the best completions, fine-tune on them, repeat",
        loop="online",
        validate="alignctl.algos.iterative_sft:validate_job",
        data="prompts",
    )
)
register(
    Algorithm(
        name="ddpo",
        config_cls=algo_configs.DDPOConfig,
        loss="alignctl.losses.ddpo:ddpo_loss",
        driver="alignctl.algos.ddpo:run_ddpo",
        description="denoising diffusion policy optimisation: RL for text-to-image pipelines (needs an image reward)",
        loop="online",
        validate="alignctl.algos.ddpo:validate_job",
        data="images",
        trains="diffusion",
    )
)
