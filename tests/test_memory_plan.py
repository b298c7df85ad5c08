"""train.gradient_checkpointing=null: on for offline runs, unless train.memory_budget_gb says the run fits without it."""

import copy
import json

import pytest
import torch

from alignctl.compose import compose_job
from alignctl.engine.memory_plan import SLACK, estimate_memory, plan_checkpointing
from alignctl.errors import ConfigError
from alignctl.models.load import load_tokenizer
from alignctl.models.policy import build_policy

CPU = torch.device("cpu")


def tiny_policy(*overrides):
    job = compose_job(["recipe=smoke/dpo", "precision=fp32", *overrides])
    return job, build_policy(job, load_tokenizer(job.model))


def checkpointing_on(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_a_budget_the_run_exceeds_turns_checkpointing_on():
    job, policy = tiny_policy("train.memory_budget_gb=0.001")
    notes = []
    assert not checkpointing_on(policy)
    assert plan_checkpointing(job, policy, [], CPU, notes) is True
    assert checkpointing_on(policy)
    (key, note), = notes
    assert key == "gradient checkpointing"
    assert note.startswith("on (estimated peak") and "> train.memory_budget_gb=0.001" in note
    assert "still over" in note  # the process alone is over 1 MB


def test_a_run_within_its_budget_stays_fast():
    job, policy = tiny_policy("train.memory_budget_gb=1000")
    notes = []
    assert plan_checkpointing(job, policy, [], CPU, notes) is False
    assert not checkpointing_on(policy)
    assert notes[0][1].startswith("off (estimated peak") and "within train.memory_budget_gb=1000" in notes[0][1]


def test_without_a_budget_checkpointing_is_on_and_the_note_says_what_it_saves():
    job, policy = tiny_policy()
    notes = []
    assert plan_checkpointing(job, policy, [], CPU, notes) is True  # even a tiny model: the least memory
    assert checkpointing_on(policy)
    note = notes[0][1]
    assert note.startswith("on (default, the least memory: estimated peak ") and "GB without" in note
    assert "train.memory_budget_gb=N" in note


@pytest.mark.parametrize("value", [True, False])
def test_an_explicit_setting_is_used_whatever_the_estimate(value):
    job, policy = tiny_policy(f"train.gradient_checkpointing={str(value).lower()}")
    notes = []
    assert plan_checkpointing(job, policy, [], CPU, notes) is value
    assert checkpointing_on(policy) is value
    (key, note), = notes
    assert key == "gradient checkpointing"
    assert note.startswith(f"{'on' if value else 'off'} (train.gradient_checkpointing={str(value).lower()}; estimated peak ")


def test_the_estimate_follows_its_documented_formula():
    job, policy = tiny_policy("train.per_device_batch_size=3")
    config = policy.config
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (getattr(config, "head_dim", None) or h // config.num_attention_heads)
    tokens = 3 * 64 * 2  # batch x algo.max_length x (chosen + rejected)
    per_layer = 36 * h + 8 * kv + 16 * i  # fp32
    logits = min(job.train.logps_chunk_size, tokens) * config.vocab_size * 10
    trainable = sum(p.numel() for p in policy.parameters())
    est = estimate_memory(job, policy, [], CPU)
    assert est.states == 12 * trainable
    assert est.activations == tokens * layers * per_layer + logits
    assert est.checkpointed_activations == tokens * (layers * 4 * h + per_layer) + logits
    assert est.peak(True) < est.peak(False)
    assert est.peak(False) == pytest.approx(est.held + SLACK * (est.states + est.activations))
    # under autocast the activations are half width, plus the half copy of the weights
    job16 = compose_job(["recipe=smoke/dpo", "precision=bf16", "train.per_device_batch_size=3"])
    half = estimate_memory(job16, policy, [], CPU)
    params = sum(p.numel() for p in policy.parameters())
    assert half.activations == tokens * layers * (26 * h + 4 * kv + 8 * i) + 2 * params + logits
    # twice the batch: twice the activations
    assert estimate_memory(compose_job(["recipe=smoke/dpo", "precision=fp32", "train.per_device_batch_size=6"]),
                           policy, [], CPU).activations - logits > 1.99 * (est.activations - logits)


def test_memory_budget_must_be_positive():
    from alignctl.validate import validate_job

    with pytest.raises(ConfigError, match=r"train.memory_budget_gb=0(\.0)?: must be > 0"):
        validate_job(compose_job(["recipe=smoke/dpo", "train.memory_budget_gb=0"]))


def test_a_budget_beside_an_explicit_setting_is_refused_not_ignored():
    from alignctl.validate import validate_job

    with pytest.raises(ConfigError, match=r"train.memory_budget_gb=2.0 decides train.gradient_checkpointing only when "
                                          r"that is null, but it is false; drop one of the two"):
        validate_job(compose_job(["recipe=smoke/dpo", "train.memory_budget_gb=2", "train.gradient_checkpointing=false"]))


def test_offline_memory_settings_are_refused_for_online_algorithms():
    from alignctl.validate import validate_job

    for key in ("train.memory_budget_gb=2", "train.trim_heap=true"):
        with pytest.raises(ConfigError, match=r"applies to the offline algorithms only, not algo=grpo"):
            validate_job(compose_job(["recipe=smoke/grpo", key]))


def test_the_run_summary_says_what_was_decided(tmp_path):
    from alignctl.registry import get_algorithm

    job = compose_job(["recipe=smoke/sft", "train.max_steps=2", "train.memory_budget_gb=0.001", "run.progress=false",
                       "run.sample_prompts=0", f"run.output_dir={tmp_path / 'run'}", "train.eval_steps=0"])
    get_algorithm("sft").load_driver()(job)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "on (estimated peak" in json.dumps(summary)


def test_a_reference_that_is_the_policy_is_counted_once():
    """peft=lora: the reference is the policy with its adapter off, not a second model (on a GPU the
    estimate counts the held weights)."""
    job, policy = tiny_policy()
    gpu = torch.device("cuda")  # only the device type is read: no GPU needed
    weights = sum(p.numel() * p.element_size() for p in policy.parameters())
    assert estimate_memory(job, policy, [policy], gpu).held == weights
    assert estimate_memory(job, policy, [copy.deepcopy(policy)], gpu).held == 2 * weights
