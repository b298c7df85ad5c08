"""Lean chunked log-prob path == naive full-logits path (values, gradients, LoRA, packing)."""

from __future__ import annotations

import pytest
import torch

from alignctl.models.logps import (
    CausalLMWithLogps,
    TokenLogps,
    plain_sequence_logps,
    sequence_logps,
    token_nll,
)

ATOL = 1e-5
# Gradients reach ~20 in magnitude here; fp32 round-off between the two (mathematically identical) paths is ~1e-6
# relative, so gradients are compared to 1e-5 absolute OR relative.
GRAD_RTOL = 1e-5
VOCAB = 1000


def _tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    # Random init with a larger scale so logits are not ~uniform (makes the comparisons meaningful).
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return _tiny_llama()


def _batch(lengths=(12, 7, 10), prompt=(4, 3, 0), seed=1):
    """Right-padded batch; labels mask the prompt and the padding."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    B = len(lengths)
    input_ids = torch.zeros(B, T, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for i, (n, p) in enumerate(zip(lengths, prompt)):
        ids = torch.randint(1, VOCAB, (n,), generator=g)
        input_ids[i, :n] = ids
        attention_mask[i, :n] = 1
        labels[i, p:n] = ids[p:]
    return input_ids, attention_mask, labels


def _assert_same(a: TokenLogps, b: TokenLogps, atol=ATOL):
    # Sums over ~100 tokens reach ~130 in magnitude: fp32 round-off between the two paths is ~1e-7
    # relative (which of them is summed in which order depends on the thread count).
    torch.testing.assert_close(a.sum_logps, b.sum_logps, atol=atol, rtol=1e-6)
    assert torch.equal(a.num_tokens, b.num_tokens)
    assert a.num_tokens.dtype == torch.long
    torch.testing.assert_close(a.logits_sum, b.logits_sum, atol=atol, rtol=0)
    assert not a.logits_sum.requires_grad
    torch.testing.assert_close(a.per_token_logps(), b.per_token_logps(), atol=atol, rtol=0)


def test_lean_matches_plain_padding_and_prompt_mask(model):
    input_ids, attention_mask, labels = _batch()
    with torch.no_grad():
        lean = sequence_logps(model, input_ids, attention_mask, labels)
        plain = plain_sequence_logps(model, input_ids, attention_mask, labels)
    _assert_same(lean, plain)
    # labels at position 0 can never be scored (no context); prompt + padding are masked
    assert lean.num_tokens.tolist() == [12 - 4, 7 - 3, 10 - 1]
    # sanity against an independent computation through the model's own logits
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    ref = []
    for i in range(3):
        idx = (labels[i, 1:] != -100).nonzero().squeeze(-1)
        lp = logits[i, idx].float().log_softmax(-1).gather(-1, labels[i, idx + 1, None]).sum()
        ref.append(lp)
    torch.testing.assert_close(lean.sum_logps, torch.stack(ref).detach(), atol=ATOL, rtol=0)
    torch.testing.assert_close(lean.mean_logps, lean.sum_logps / lean.num_tokens, atol=1e-7, rtol=0)
    # TRL's logits/chosen metric
    mask = labels[:, 1:] != -100
    torch.testing.assert_close(
        lean.logits_sum.sum() / lean.num_tokens.sum(),
        logits[:, :-1][mask].mean().detach(),
        atol=ATOL,
        rtol=0,
    )


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 4096])
def test_chunk_size_does_not_change_result(model, chunk_size):
    input_ids, attention_mask, labels = _batch()
    with torch.no_grad():
        ref = sequence_logps(model, input_ids, attention_mask, labels, chunk_size=4096)
        out = sequence_logps(model, input_ids, attention_mask, labels, chunk_size=chunk_size)
    assert int(ref.num_tokens.sum()) > 3 * 3  # several chunks at chunk_size=3
    _assert_same(out, ref)


def _param_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk_size", [3, 1024])
def test_gradients_match_plain(chunk_size):
    model = _tiny_llama(seed=3).train()
    input_ids, attention_mask, labels = _batch()

    def loss_of(out: TokenLogps):
        # uses both a per-sequence term and the token-mean loss so all paths are exercised
        return token_nll(out) + 0.1 * (out.sum_logps * torch.tensor([1.0, -2.0, 0.5])).sum()

    model.zero_grad(set_to_none=True)
    lean = sequence_logps(model, input_ids, attention_mask, labels, chunk_size=chunk_size)
    loss_of(lean).backward()
    g_lean = _param_grads(model)

    model.zero_grad(set_to_none=True)
    plain = plain_sequence_logps(model, input_ids, attention_mask, labels)
    loss_of(plain).backward()
    g_plain = _param_grads(model)

    assert g_lean.keys() == g_plain.keys() and len(g_lean) == len(list(model.parameters()))
    for name in g_plain:
        torch.testing.assert_close(g_lean[name], g_plain[name], atol=ATOL, rtol=GRAD_RTOL, msg=name)
    _assert_same(lean, plain)


def test_backward_recomputes_chunks_instead_of_saving_logits():
    """Saved-for-backward tensors of the lean path contain no [*, vocab] fp32 logits."""
    model = _tiny_llama(seed=4).train()
    input_ids, attention_mask, labels = _batch()
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = sequence_logps(model, input_ids, attention_mask, labels, chunk_size=4)
    assert not any(s and s[-1] == VOCAB and len(s) >= 2 and s[0] != VOCAB for s in saved), saved
    token_nll(out).backward()  # still differentiable

    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        plain_sequence_logps(model, input_ids, attention_mask, labels)
    assert any(s[-1] == VOCAB and len(s) == 3 for s in saved)  # the naive path does keep them


def test_temperature(model):
    input_ids, attention_mask, labels = _batch()
    with torch.no_grad():
        lean = sequence_logps(model, input_ids, attention_mask, labels, temperature=0.7, chunk_size=5)
        plain = plain_sequence_logps(model, input_ids, attention_mask, labels, temperature=0.7)
        t1 = sequence_logps(model, input_ids, attention_mask, labels)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    _assert_same(lean, plain)
    assert not torch.allclose(lean.sum_logps, t1.sum_logps)
    # logits_sum is the model's logits, before temperature
    torch.testing.assert_close(lean.logits_sum, t1.logits_sum, atol=ATOL, rtol=0)
    mask = labels[:, 1:] != -100
    lp = (logits / 0.7).log_softmax(-1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(lean.sum_logps, (lp * mask).sum(-1), atol=ATOL, rtol=1e-6)


def test_packed_sequences_match_separate(model):
    """One packed row (attention_mask=None, position_ids restarting at 0) == the examples run separately."""
    input_ids, attention_mask, labels = _batch(lengths=(6, 9, 5), prompt=(2, 3, 0))
    lengths = attention_mask.sum(-1).tolist()
    with torch.no_grad():
        separate = sequence_logps(model, input_ids, attention_mask, labels)

    packed_ids = torch.cat([input_ids[i, :n] for i, n in enumerate(lengths)])[None]
    packed_labels = torch.cat([labels[i, :n] for i, n in enumerate(lengths)])[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        lean = sequence_logps(model, packed_ids, None, packed_labels, position_ids=position_ids, chunk_size=4)
        plain = plain_sequence_logps(model, packed_ids, None, packed_labels, position_ids=position_ids)
        # without position ids the examples would attend to each other: different numbers
        leaky = sequence_logps(model, packed_ids, None, packed_labels)
    _assert_same(lean, plain)
    assert int(lean.num_tokens) == int(separate.num_tokens.sum())
    per_tok = lean.per_token_logps()[0]
    bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()
    per_example = torch.stack([per_tok[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])])
    torch.testing.assert_close(per_example, separate.sum_logps, atol=ATOL, rtol=0)
    torch.testing.assert_close(lean.logits_sum.sum(), separate.logits_sum.sum(), atol=1e-4, rtol=0)
    assert not torch.allclose(leaky.sum_logps, lean.sum_logps, atol=1e-3)


def test_packed_first_token_label_is_ignored(model):
    """A label on the first token of a packed example would be predicted from the previous example: dropped."""
    ids = torch.randint(1, VOCAB, (1, 8), generator=torch.Generator().manual_seed(5))
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    with torch.no_grad():
        out = sequence_logps(model, ids, None, ids.clone(), position_ids=position_ids)
        plain = plain_sequence_logps(model, ids, None, ids.clone(), position_ids=position_ids)
    assert out.num_tokens.tolist() == [6]
    _assert_same(out, plain)


def test_lora_and_disable_adapter():
    from peft import LoraConfig, get_peft_model

    base = _tiny_llama(seed=6)
    peft_model = get_peft_model(
        base,
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"], lora_dropout=0.0),
    )
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft_model.eval()
    input_ids, attention_mask, labels = _batch()

    with torch.no_grad():
        on = sequence_logps(peft_model, input_ids, attention_mask, labels, chunk_size=3)
        on_plain = plain_sequence_logps(peft_model, input_ids, attention_mask, labels)
        with peft_model.disable_adapter():
            off = sequence_logps(peft_model, input_ids, attention_mask, labels, chunk_size=3)
            off_plain = plain_sequence_logps(peft_model, input_ids, attention_mask, labels)
    _assert_same(on, on_plain)
    _assert_same(off, off_plain)
    assert (on.sum_logps - off.sum_logps).abs().max() > 1e-2
    # adapter off == the bare base model with fresh, identical weights
    ref = _tiny_llama(seed=6)
    with torch.no_grad():
        bare = sequence_logps(ref, input_ids, attention_mask, labels)
    _assert_same(off, bare)

    # gradients reach the LoRA parameters, identically to the plain path
    peft_model.train()
    peft_model.zero_grad(set_to_none=True)
    token_nll(sequence_logps(peft_model, input_ids, attention_mask, labels, chunk_size=3)).backward()
    g_lean = _param_grads(peft_model)
    peft_model.zero_grad(set_to_none=True)
    token_nll(plain_sequence_logps(peft_model, input_ids, attention_mask, labels)).backward()
    g_plain = _param_grads(peft_model)
    assert g_lean.keys() == g_plain.keys() and any("lm_head" in n for n in g_lean)
    assert all("lora_" in n for n in g_lean)
    for name in g_plain:
        torch.testing.assert_close(g_lean[name], g_plain[name], atol=ATOL, rtol=GRAD_RTOL, msg=name)


def test_wrapper_module_and_token_nll(model):
    input_ids, attention_mask, labels = _batch()
    wrapper = CausalLMWithLogps(model, chunk_size=4)
    assert wrapper.model is model
    with torch.no_grad():
        out = wrapper(input_ids, attention_mask, labels)
        ref = plain_sequence_logps(model, input_ids, attention_mask, labels)
        hf_loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    assert isinstance(out, dict) and all(isinstance(v, torch.Tensor) for v in out.values())
    res = TokenLogps.from_dict(out, seq_len=input_ids.shape[1])
    _assert_same(res, ref)
    # token_nll == the mean token cross-entropy transformers computes
    torch.testing.assert_close(token_nll(res), hf_loss, atol=ATOL, rtol=0)


def test_no_label_tokens_still_backpropagates():
    model = _tiny_llama(seed=8).train()
    input_ids, attention_mask, _ = _batch()
    labels = torch.full_like(input_ids, -100)
    out = sequence_logps(model, input_ids, attention_mask, labels)
    assert out.num_tokens.tolist() == [0, 0, 0] and out.sum_logps.tolist() == [0.0, 0.0, 0.0]
    loss = token_nll(out)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and p.grad.abs().max() == 0 for p in model.parameters())


def _tiny_other(arch: str):
    import transformers

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    extra = {
        "Gemma2": dict(head_dim=16, final_logit_softcapping=2.0),  # tanh soft-capping
        "Granite": dict(logits_scaling=3.0),  # logits / 3
        "Cohere": dict(logit_scale=0.3),  # logits * 0.3
    }[arch]
    torch.manual_seed(9)
    config = getattr(transformers, f"{arch}Config")(**common, **extra)
    model = getattr(transformers, f"{arch}ForCausalLM")(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("arch", ["Gemma2", "Granite", "Cohere"])
def test_logit_softcapping_and_scaling_match_plain(arch):
    model = _tiny_other(arch)
    input_ids, attention_mask, labels = _batch()
    with torch.no_grad():
        lean = sequence_logps(model, input_ids, attention_mask, labels, chunk_size=3)
        plain = plain_sequence_logps(model, input_ids, attention_mask, labels)
    _assert_same(lean, plain)
