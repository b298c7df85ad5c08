"""Rollout generation: settings, response cutting (EOS, stop strings), sampling, log-probs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from alignctl.config import ArchConfig
from alignctl.errors import ConfigError
from alignctl.models.tiny import build_tiny_model
from alignctl.rollout.generate import (
    Generated,
    GenerationSettings,
    cut_responses,
    generate,
    left_pad,
    sampled_logprobs,
)

PROMPTS = ["Hello there", "What is the capital of France?", "Hi"]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer


@pytest.fixture()
def model(tok):
    return build_tiny_model(ArchConfig(), tok)


@pytest.fixture(scope="module")
def prompts(tok):
    seqs = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    ids, mask = left_pad(seqs, tok.pad_token_id)
    return seqs, ids, mask


class Script:
    """A forward hook on ``lm_head`` that makes row ``b`` pick ``rows[b][step]`` at each step (greedy).

    Entries may be None (no push at that step). Each generate step is one forward (KV cache).
    """

    def __init__(self, rows):
        self.rows = rows
        self.step = 0

    def __call__(self, module, inputs, output):
        out = output.clone()
        for b, seq in enumerate(self.rows):
            if self.step < len(seq) and seq[self.step] is not None:
                out[b, -1, seq[self.step]] += 1e4
        self.step += 1
        return out


def scripted(model, rows):
    return model.lm_head.register_forward_hook(Script(rows))


# --------------------------------------------------------------------------- settings


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", 0.0),
        ("temperature", -1.0),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("max_new_tokens", 0),
        ("min_new_tokens", 100),
        ("top_k", -1),
        ("stop_strings", [""]),
    ],
)
def test_settings_validate_names_the_field(field, value):
    settings = GenerationSettings(**{field: value})
    with pytest.raises(ConfigError, match=rf"generation\.{field}="):
        settings.validate()


def test_settings_from_config_node_object_and_defaults():
    node = OmegaConf.create({"max_new_tokens": 8, "temperature": 0.7, "stop_strings": ["\n\n"], "other": 1})
    settings = GenerationSettings.from_config(node)
    assert settings == GenerationSettings(max_new_tokens=8, temperature=0.7, stop_strings=["\n\n"])
    assert isinstance(settings.stop_strings, list)
    assert GenerationSettings.from_config(SimpleNamespace(top_k=5)) == GenerationSettings(top_k=5)
    with pytest.raises(ConfigError, match=r"generation\.top_p"):
        GenerationSettings.from_config({"top_p": 2.0})


# --------------------------------------------------------------------------- cutting


def test_cut_after_first_eos_inclusive():
    raw = torch.tensor([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9], [2, 3, 3, 3, 3]])
    ids, mask, finished = cut_responses(raw, eos_ids=[2], pad_id=3)
    assert ids.tolist() == [[5, 6, 2, 3, 3], [5, 6, 7, 8, 9], [2, 3, 3, 3, 3]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert finished.tolist() == [True, False, True]
    assert mask.dtype == torch.long and finished.dtype == torch.bool


def test_cut_when_pad_is_eos():
    raw = torch.tensor([[5, 6, 2, 2, 2], [5, 2, 2, 2, 2], [5, 6, 7, 8, 9]])
    ids, mask, finished = cut_responses(raw, eos_ids=[2], pad_id=2)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert finished.tolist() == [True, True, False]
    assert ids.tolist() == raw.tolist()


def test_cut_with_several_eos_ids_and_stop_ends():
    raw = torch.tensor([[5, 9, 6, 7, 8], [5, 6, 2, 7, 8], [5, 6, 7, 8, 9]])
    ids, mask, finished = cut_responses(raw, eos_ids=[2, 9], pad_id=0, stop_ends=[4, 4, 2])
    # row 0: EOS id 9 at 1 comes first; row 1: EOS at 2 before the stop end; row 2: stop after 2 tokens
    assert mask.sum(-1).tolist() == [2, 3, 2]
    assert ids[2].tolist() == [5, 6, 0, 0, 0]
    assert finished.tolist() == [True, True, True]
    _, mask, finished = cut_responses(raw, eos_ids=[2], pad_id=0, stop_ends=[None, None, None])
    assert mask.sum(-1).tolist() == [5, 3, 5] and finished.tolist() == [False, True, False]


# --------------------------------------------------------------------------- generate


def test_generate_shapes_modes_and_cache(model, tok, prompts):
    _, ids, mask = prompts
    model.train()
    model.config.use_cache = False  # as training sets it
    lengths = []
    hook = model.model.register_forward_pre_hook(
        lambda m, a, kw: lengths.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        torch.manual_seed(0)
        out = generate(model, tok, ids, mask, GenerationSettings(max_new_tokens=6))
    finally:
        hook.remove()
    assert isinstance(out, Generated)
    B = ids.shape[0]
    assert out.response_ids.shape == out.response_mask.shape and out.response_ids.shape[0] == B
    assert out.response_ids.shape[1] <= 6 and out.finished.shape == (B,) and len(out.texts) == B
    assert out.response_ids.dtype == torch.long and out.response_mask.dtype == torch.long
    assert lengths[0] == ids.shape[1] and set(lengths[1:]) == {1}  # prefill, then one token per step
    assert model.training  # training mode restored
    assert not model.config.use_cache


def test_generate_cuts_after_eos_and_pads(model, tok, prompts):
    _, ids, mask = prompts
    eos, pad = tok.eos_token_id, tok.pad_token_id
    hook = scripted(model, [[None, None, eos], [], [eos]])
    try:
        out = generate(model, tok, ids, mask, GenerationSettings(max_new_tokens=5, do_sample=False))
    finally:
        hook.remove()
    assert out.response_mask.sum(-1).tolist() == [3, 5, 1]
    assert out.finished.tolist() == [True, False, True]
    assert out.response_ids[0, 2] == eos and (out.response_ids[0, 3:] == pad).all()
    assert out.response_ids[2].tolist() == [eos] + [pad] * 4
    assert out.texts[2] == "" and "<|im_end|>" not in out.texts[0]


def test_min_new_tokens_blocks_eos(model, tok, prompts):
    _, ids, mask = prompts
    eos = tok.eos_token_id
    hook = scripted(model, [[eos] * 10] * 3)
    try:
        out = generate(model, tok, ids, mask, GenerationSettings(max_new_tokens=10, min_new_tokens=3))
    finally:
        hook.remove()
    assert out.response_mask.sum(-1).tolist() == [4, 4, 4]
    assert (out.response_ids[:, 3] == eos).all() and not (out.response_ids[:, :3] == eos).any()
    assert out.finished.all()


def test_stop_strings_cut_after_completing_token(model, tok, prompts):
    _, ids, mask = prompts
    stop_row = tok("Hello world and more text follows here", add_special_tokens=False)["input_ids"]
    plain_row = tok("nothing to see in this row at all today", add_special_tokens=False)["input_ids"]
    k = next(k for k in range(1, len(stop_row) + 1) if "world" in tok.decode(stop_row[:k]))
    n = min(len(stop_row), len(plain_row), 8)
    assert k < n
    hook = scripted(model, [stop_row, plain_row, plain_row])
    try:
        settings = GenerationSettings(max_new_tokens=n, do_sample=False, stop_strings=["world"])
        out = generate(model, tok, ids, mask, settings)
    finally:
        hook.remove()
    assert out.response_ids[0, :k].tolist() == stop_row[:k]
    assert out.response_mask.sum(-1).tolist() == [k, n, n]
    assert (out.response_ids[0, k:] == tok.pad_token_id).all()
    assert out.finished.tolist() == [True, False, False]
    assert out.texts[0] == "Hello "
    assert out.texts[1] == tok.decode(plain_row[:n])


def test_sampling_is_reproducible_from_the_global_seed(model, tok, prompts):
    _, ids, mask = prompts
    settings = GenerationSettings(max_new_tokens=8, temperature=0.9, top_k=50, top_p=0.95)
    torch.manual_seed(0)
    a = generate(model, tok, ids, mask, settings)
    torch.manual_seed(0)
    b = generate(model, tok, ids, mask, settings)
    c = generate(model, tok, ids, mask, settings)
    assert torch.equal(a.response_ids, b.response_ids) and a.texts == b.texts
    assert not torch.equal(a.response_ids, c.response_ids)


def test_left_padded_batch_matches_prompts_alone_greedy(model, tok, prompts):
    seqs, ids, mask = prompts
    settings = GenerationSettings(max_new_tokens=8, do_sample=False)
    batch = generate(model, tok, ids, mask, settings)
    for i, seq in enumerate(seqs):
        one = generate(model, tok, *left_pad([seq], tok.pad_token_id), settings)
        n = int(one.response_mask.sum())
        assert batch.response_ids[i, :n].tolist() == one.response_ids[0, :n].tolist()
        assert int(batch.response_mask[i].sum()) == n


def test_model_generation_config_defaults_do_not_leak(model, tok, prompts):
    _, ids, mask = prompts
    settings = GenerationSettings(max_new_tokens=4, do_sample=False)
    plain = generate(model, tok, ids, mask, settings)
    model.generation_config.suppress_tokens = plain.response_ids[:, 0].tolist()
    model.generation_config.repetition_penalty = 5.0
    again = generate(model, tok, ids, mask, settings)
    assert torch.equal(plain.response_ids, again.response_ids)
    assert model.generation_config.repetition_penalty == 5.0  # the model's config is left as it was


def test_generate_with_peft_model(model, tok, prompts):
    from peft import LoraConfig, get_peft_model

    _, ids, mask = prompts
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    out = generate(peft_model, tok, ids, mask, GenerationSettings(max_new_tokens=4))
    logps = sampled_logprobs(peft_model, ids, mask, out.response_ids, out.response_mask)
    assert logps.shape == out.response_ids.shape


# --------------------------------------------------------------------------- log-probs


def naive_logprobs(model, ids, mask, resp, resp_mask, temperature):
    input_ids = torch.cat([ids, resp], 1)
    attention = torch.cat([mask, resp_mask], 1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions).logits.float()
    logps = (logits[:, :-1] / temperature).log_softmax(-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return logps[:, ids.shape[1] - 1 :] * resp_mask


def test_sampled_logprobs_match_naive_and_depend_on_temperature(model, tok, prompts):
    _, ids, mask = prompts
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.2)  # peaked logits, so temperature matters
    eos = tok.eos_token_id
    hook = scripted(model, [[None, eos], [], [None, None, None, eos]])
    try:
        torch.manual_seed(1)
        out = generate(model, tok, ids, mask, GenerationSettings(max_new_tokens=6))
    finally:
        hook.remove()
    assert out.response_mask.sum(-1).tolist() == [2, 6, 4]
    model.eval()
    with torch.no_grad():
        by_t = {}
        for t in (1.0, 0.7):
            lean = sampled_logprobs(model, ids, mask, out.response_ids, out.response_mask, temperature=t, chunk_size=3)
            naive = naive_logprobs(model, ids, mask, out.response_ids, out.response_mask, t)
            torch.testing.assert_close(lean, naive, atol=1e-5, rtol=0)
            assert (lean[out.response_mask == 0] == 0).all()
            by_t[t] = lean
    assert lean.shape == out.response_ids.shape and lean.dtype == torch.float32
    assert not torch.allclose(by_t[1.0], by_t[0.7])


def test_sampled_logprobs_are_differentiable(model, tok, prompts):
    _, ids, mask = prompts
    resp = torch.tensor([[5, 6], [7, 3], [8, 9]])
    resp_mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    logps = sampled_logprobs(model, ids, mask, resp, resp_mask)
    logps.sum().backward()
    assert model.lm_head.weight.grad is not None
