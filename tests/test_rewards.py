"""Reward sources: TRL-style reward functions (loading, calling, errors), the reward-model scorer, weights."""

from __future__ import annotations

import math

import pytest
import torch

from alignctl.config import ArchConfig
from alignctl.data.encode import encode_completion, encode_prompt
from alignctl.errors import AlignctlError, ConfigError, ModelLoadError
from alignctl.models.tiny import build_tiny_model
from alignctl.rl.reward_functions import keyword, length_target
from alignctl.rl.rewards import (
    RewardModelScorer,
    RewardSources,
    call_reward_function,
    load_reward_function,
)

MODULE = "alignctl_test_user_rewards"
USER_CODE = '''
import numpy as np
import torch

def constant(prompts, completions, **kwargs):
    return [1.0] * len(completions)

def echo_columns(prompts, completions, completion_ids, answer, **kwargs):
    return [float(c == a) + len(ids) / 100 for c, a, ids in zip(completions, answer, completion_ids)]

def seen_kwargs(prompts, completions, **kwargs):
    return [float(len(kwargs))] * len(completions)

def some_none(prompts, completions, **kwargs):
    return [None if i % 2 else 2.0 for i in range(len(completions))]

def as_tensor(prompts, completions, **kwargs):
    return torch.arange(len(completions), dtype=torch.float64)

def as_array(prompts, completions, **kwargs):
    return np.ones(len(completions), dtype=np.int64)

def as_matrix(prompts, completions, **kwargs):
    return np.ones((len(completions), 2))

def bools(prompts, completions, **kwargs):
    return [True, False][: len(completions)]

def raises(prompts, completions, **kwargs):
    raise ValueError("no such column\\nsecond line")

def too_few(prompts, completions, **kwargs):
    return [0.0]

def with_string(prompts, completions, **kwargs):
    return [0.0, "high"]

def with_inf(prompts, completions, **kwargs):
    return [0.0, float("inf")]

def scalar(prompts, completions, **kwargs):
    return 1.0

class Holder:
    @staticmethod
    def method(prompts, completions, **kwargs):
        return [3.0] * len(completions)

NOT_CALLABLE = 42
'''

BATCH = dict(prompts=["Q1:", "Q2:"], completions=[" yes", " no"], completion_ids=[[5, 6], [7]])


@pytest.fixture(scope="module", autouse=True)
def user_module(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user_code")
    (folder / f"{MODULE}.py").write_text(USER_CODE)
    (folder / f"{MODULE}_broken.py").write_text("raise RuntimeError('boom at import')\n")
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(folder))
    yield
    mp.undo()


def fn(name):
    return f"{MODULE}:{name}"


def score(name, columns=None, **batch):
    args = {**BATCH, **batch}
    return call_reward_function(load_reward_function(fn(name)), name, columns=columns, **args)


# --------------------------------------------------------------------------- loading


def test_load_by_module_and_attribute_path():
    assert load_reward_function("alignctl.rl.reward_functions:length_target") is length_target
    assert load_reward_function(fn("Holder.method"))(prompts=[], completions=["a"]) == [3.0]


@pytest.mark.parametrize("name", ["no_colon", ":fn", "module:", ""])
def test_malformed_name(name):
    with pytest.raises(ConfigError, match=r"reward\.functions: .* is not 'module:function'"):
        load_reward_function(name)


def test_import_errors_name_the_module():
    with pytest.raises(AlignctlError, match=r"function 'no_such_mod_xyz:f': cannot import module no_such_mod_xyz \("):
        load_reward_function("no_such_mod_xyz:f")
    with pytest.raises(AlignctlError, match=r"cannot import module .*_broken \(RuntimeError: boom at import\)"):
        load_reward_function(f"{MODULE}_broken:f")


def test_missing_attribute_and_not_callable():
    with pytest.raises(AlignctlError, match=rf"reward function '{MODULE}:nope': .* has no attribute 'nope'"):
        load_reward_function(fn("nope"))
    with pytest.raises(AlignctlError, match=r"NOT_CALLABLE is a int, not a function"):
        load_reward_function(fn("NOT_CALLABLE"))


# --------------------------------------------------------------------------- calling


def test_columns_reach_the_function_aligned_with_the_batch():
    out = score("echo_columns", columns={"answer": [" yes", " maybe"]})
    assert out.tolist() == pytest.approx([1.02, 0.01])
    # kwargs: completion_ids, a, b (a column named like an argument is not forwarded)
    out = score("seen_kwargs", columns={"a": [1, 2], "b": [3, 4], "completions": ["x", "y"]})
    assert out.tolist() == [3.0, 3.0]


def test_return_types_and_none_becomes_nan():
    assert score("as_tensor").tolist() == [0.0, 1.0]
    assert score("as_array").tolist() == [1.0, 1.0]
    assert score("bools").tolist() == [1.0, 0.0]
    out = score("some_none")
    assert out[0] == 2.0 and math.isnan(out[1])
    assert out.dtype == torch.float32


@pytest.mark.parametrize(
    "name, message",
    [
        ("raises", r"reward function '.*raises' raised ValueError: no such column$"),
        ("too_few", r"reward function '.*too_few' returned 1 rewards for 2 completions"),
        ("with_string", r"reward function '.*with_string': reward 1 is 'high' \(str\), not a number"),
        ("with_inf", r"reward function '.*with_inf': reward 1 is inf"),
        ("scalar", r"reward function '.*scalar' returned a float; return a list of numbers"),
        ("as_matrix", r"reward function '.*as_matrix' returned an array of shape \(2, 2\)"),
    ],
)
def test_call_errors_name_the_function(name, message):
    with pytest.raises(AlignctlError, match=message):
        RewardSources([fn(name)])(**BATCH, columns={})


# --------------------------------------------------------------------------- sources and weights


def test_no_source_is_a_config_error():
    message = r"needs a reward: set reward\.model .* or reward\.functions, e\.g\. reward\.functions=\["
    with pytest.raises(ConfigError, match=message):
        RewardSources([], None, None)


def test_weights_and_nan_as_zero_in_total():
    sources = RewardSources([fn("constant"), fn("some_none")], None, [0.5, 2.0])
    assert sources.names == ["constant", "some_none"]
    result = sources(**BATCH, columns={})
    assert result.total.tolist() == [0.5 + 4.0, 0.5]  # row 1: some_none gave None -> counts 0
    assert set(result.per_source) == {"constant", "some_none"}
    assert math.isnan(result.per_source["some_none"][1])
    assert RewardSources([fn("constant")]).weights == [1.0]


@pytest.mark.parametrize("weights", [[1.0], [1.0, 2.0, 3.0]])
def test_weights_length_must_match_sources(weights):
    with pytest.raises(ConfigError, match=rf"reward\.weights has {len(weights)} values for 2 reward sources"):
        RewardSources([fn("constant"), fn("bools")], None, weights)


def test_weights_must_be_numbers():
    with pytest.raises(ConfigError, match=r"reward\.weights: 'x' is not a finite number"):
        RewardSources([fn("constant")], None, ["x"])


def test_source_names_stay_unique():
    sources = RewardSources([fn("constant"), fn("constant"), lambda prompts, completions, **kw: [0.0] * 2])
    assert sources.names == [fn("constant"), f"{fn('constant')}_2", "<lambda>"]
    assert list(sources(**BATCH).per_source) == sources.names


# --------------------------------------------------------------------------- shipped functions


def test_length_target():
    completions = ["x" * 40, "x" * 20, "x" * 100, "x" * 15]
    assert length_target(["p"] * 4, completions) == [1.0, 0.5, 0.0, 0.375]
    assert length_target(["p"] * 2, ["x" * 10, "x" * 10], target_length=[20, None]) == [0.5, 0.25]
    with pytest.raises(AlignctlError, match=r"'length_target' raised ValueError: row 0: target_length must be"):
        RewardSources(["alignctl.rl.reward_functions:length_target"])(["p"], ["a"], [[1]], {"target_length": [0]})


def test_keyword():
    completions = ["Thank you!", "no", "PLEASE do", "a cat"]
    assert keyword(["p"] * 4, completions) == [1.0, 0.0, 1.0, 0.0]
    rows = [["cat", "dog"], "bird, Cat", None, []]
    assert keyword(["p"] * 4, ["a Dog", "a CAT", "thanks", "cat"], keywords=rows) == [1.0, 1.0, 1.0, 0.0]


def test_shipped_functions_through_sources():
    sources = RewardSources(
        ["alignctl.rl.reward_functions:length_target", "alignctl.rl.reward_functions:keyword"], weights=[1.0, 0.5]
    )
    columns = {"target_length": [20, 8], "keywords": ["dog", ["cat"]]}
    result = sources(["p", "q"], ["x" * 20, "cats"], [[1], [2]], columns)
    assert result.per_source["length_target"].tolist() == [1.0, 0.5]
    assert result.per_source["keyword"].tolist() == [0.0, 1.0]
    assert result.total.tolist() == [1.0, 1.0]


# --------------------------------------------------------------------------- reward model


def save_classifier(folder, tokenizer, num_labels=1):
    """A tiny reward model saved like `alignctl train algo=reward` does (see load_reward_model)."""
    from transformers import LlamaForSequenceClassification

    base = build_tiny_model(ArchConfig(), tokenizer)
    base.config.num_labels = num_labels
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(base.config)
    model.model.load_state_dict(base.model.state_dict())
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.eval()


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, tiny_tokenizer):
    run = tmp_path_factory.mktemp("reward_run")
    model = save_classifier(run / "final_model", tiny_tokenizer)
    return run, model


def test_scorer_round_trip_equals_direct_forward(reward_run, tiny_tokenizer):
    run, model = reward_run
    scorer = RewardModelScorer(run, "cpu", batch_size=2)
    assert not scorer.model.training
    assert not any(p.requires_grad for p in scorer.model.parameters())
    prompts = ["Q: hi\nA:", "Write a short greeting:", "Why?"]
    completions = [" hello there, how are you today", " hi", ""]
    scores = scorer.score(prompts, completions)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    with torch.no_grad():
        for i, (p, c) in enumerate(zip(prompts, completions)):
            ids = encode_prompt(tiny_tokenizer, p) + encode_completion(tiny_tokenizer, c, add_eos=True)
            direct = model(input_ids=torch.tensor([ids])).logits[0, 0]
            assert scores[i].item() == pytest.approx(direct.item(), abs=1e-5)
    assert len(set(scores.tolist())) == 3
    # the model folder itself works too, and a long text keeps its first max_length tokens
    short = RewardModelScorer(run / "final_model", "cpu", max_length=4)
    assert short.encode(prompts[0], completions[0]) == scorer.encode(prompts[0], completions[0])[:4]


def test_scorer_in_reward_sources_with_weights(reward_run):
    run, _ = reward_run
    scorer = RewardModelScorer(run, "cpu")
    sources = RewardSources([fn("constant")], scorer, weights=[2.0, 0.5])
    assert sources.names == ["reward_model", "constant"]
    result = sources(**BATCH, columns={})
    rm = scorer.score(BATCH["prompts"], BATCH["completions"])
    torch.testing.assert_close(result.per_source["reward_model"], rm)
    torch.testing.assert_close(result.total, 2.0 * rm + 0.5)


def test_scorer_path_errors(tmp_path, tiny_tokenizer):
    with pytest.raises(ConfigError, match=r"reward\.model=.*missing: no such directory"):
        RewardModelScorer(tmp_path / "missing", "cpu")
    with pytest.raises(ConfigError, match=r"reward\.model=.*: no config\.json there or in its final_model/"):
        RewardModelScorer(tmp_path, "cpu")
    (tmp_path / "final_model").mkdir()
    (tmp_path / "final_model" / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"reward\.model=.*: holds a LoRA adapter only"):
        RewardModelScorer(tmp_path, "cpu")


def test_scorer_refuses_multi_label_classifier(tmp_path, tiny_tokenizer):
    save_classifier(tmp_path / "clf", tiny_tokenizer, num_labels=2)
    with pytest.raises(ModelLoadError, match=r"reward\.model=.*: the model has 2 outputs"):
        RewardModelScorer(tmp_path / "clf", "cpu")
