"""Padding-free pairwise batches: same log-probs, losses and gradients as the padded path."""

from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from alignctl.algos.dpo import DPOAlgorithm
from alignctl.algos.kto import KTOAlgorithm
from alignctl.algos.preference import forward_pairs
from alignctl.algos.reference_free import CPOAlgorithm, ORPOAlgorithm
from alignctl.compose import compose_job
from alignctl.data.collate import unpad_batch
from alignctl.engine.window import Weighted
from alignctl.errors import ConfigError
from alignctl.models.load import load_tokenizer
from alignctl.models.varlen import VARLEN_SDPA, attn_implementation
from alignctl.models.logps import unwrap_causal_lm

CPU = SimpleNamespace(
    device=torch.device("cpu"), autocast=nullcontext, num_processes=1, is_main_process=True, unwrap_model=lambda m: m
)

CASES = {
    "dpo": (DPOAlgorithm, ["recipe=smoke/dpo"]),
    "dpo-ipo": (DPOAlgorithm, ["recipe=smoke/dpo", "algo.loss_type=ipo"]),
    "dpo-precomputed": (DPOAlgorithm, ["recipe=smoke/dpo", "algo.precompute_ref_logps=true"]),
    "cpo": (CPOAlgorithm, ["recipe=smoke/cpo"]),
    "simpo": (CPOAlgorithm, ["recipe=smoke/simpo"]),
    "orpo": (ORPOAlgorithm, ["recipe=smoke/orpo"]),
    "kto": (KTOAlgorithm, ["recipe=smoke/kto"]),
}


def setup_algorithm(cls, overrides):
    job = compose_job([*overrides, "precision=fp32"])
    tokenizer = load_tokenizer(job.model)
    algorithm = cls(job.algo)
    data = algorithm.prepare_data(job, tokenizer)
    padded_collate = data.collate
    model = algorithm.build_model(job, tokenizer)
    algorithm.setup(job, CPU, model, data)
    return algorithm, model, data, padded_collate


def loss_and_grads(algorithm, model, batch):
    model.zero_grad(set_to_none=True)
    loss, metrics = algorithm.compute_loss(model, batch, train=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), {k: metric_value(v) for k, v in metrics.items()}, grads


def metric_value(value) -> float:
    if isinstance(value, Weighted):  # KTO's per-kind metrics: (sum, count)
        return float(value.total) / max(float(value.weight), 1.0)
    return float(value)


@pytest.mark.parametrize("case", list(CASES))
def test_padding_free_matches_padded(case):
    cls, overrides = CASES[case]
    torch.manual_seed(0)
    algorithm, model, data, padded_collate = setup_algorithm(cls, overrides)
    assert ("padding-free", "on (sdpa, one causal kernel per sequence)") in data.notes
    assert attn_implementation(unwrap_causal_lm(model.model)) == VARLEN_SDPA
    with torch.no_grad():  # move the policy off the reference so losses are not at their start value
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    examples = data.train[:5]
    padded, free = padded_collate(examples), data.collate(examples)
    assert "attention_mask" not in free and free["input_ids"].shape[0] == 1
    assert free["input_ids"].shape[1] == int(padded["seq_lengths"].sum()) < padded["input_ids"].numel()

    with torch.no_grad():
        a, b = forward_pairs(model, padded), forward_pairs(model, free)
    torch.testing.assert_close(b.sum_logps, a.sum_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.logits_sum, a.logits_sum, rtol=1e-5, atol=1e-5)
    assert torch.equal(b.num_tokens, a.num_tokens)
    # per-token log-probs keep the padded layout (what length-aware options read)
    torch.testing.assert_close(b.per_token_logps(), a.per_token_logps(), rtol=1e-5, atol=1e-5)
    assert torch.equal(b.per_token_mask(), a.per_token_mask())

    loss_a, metrics_a, grads_a = loss_and_grads(algorithm, model, padded)
    loss_b, metrics_b, grads_b = loss_and_grads(algorithm, model, free)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert metrics_b.keys() == metrics_a.keys()
    for key in metrics_a:
        assert metrics_b[key] == pytest.approx(metrics_a[key], rel=1e-4, abs=1e-5), key
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6)


def test_unpad_batch_layout():
    batch = {
        "input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
        "labels": torch.tensor([[-100, 6, 7], [-100, 9, -100]]),
        "seq_lengths": torch.tensor([3, 2]),
        "row_index": torch.tensor([4]),
    }
    out = unpad_batch(batch)
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert out["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert out["cu_seq_lens"].tolist() == [0, 3, 5] and out["cu_seq_lens"].dtype == torch.int32
    assert "attention_mask" not in out and out["row_index"].tolist() == [4]


def test_padding_free_off_and_refused():
    _, model, data, _ = setup_algorithm(DPOAlgorithm, ["recipe=smoke/dpo", "algo.padding_free=false"])
    assert ("padding-free", "off (algo.padding_free=false)") in data.notes
    assert attn_implementation(unwrap_causal_lm(model.model)) == "sdpa"
    # a kernel without position-id masking: off by default (with the reason), refused when asked for
    _, _, data, _ = setup_algorithm(DPOAlgorithm, ["recipe=smoke/dpo", "model.attn_implementation=flex_attention"])
    assert any(k == "padding-free" and v.startswith("off (attention implementation 'flex_attention'") for k, v in data.notes)
    with pytest.raises(ConfigError, match="algo.padding_free=true"):
        setup_algorithm(DPOAlgorithm, ["recipe=smoke/dpo", "algo.padding_free=true", "model.attn_implementation=flex_attention"])


def test_eager_attention_gives_the_same_padding_free_logps():
    algorithm, model, data, padded_collate = setup_algorithm(
        CPOAlgorithm, ["recipe=smoke/cpo", "model.attn_implementation=eager"]
    )
    assert ("padding-free", "on (eager, block-diagonal mask)") in data.notes
    examples = data.train[:3]
    with torch.no_grad():
        a = forward_pairs(model, padded_collate(examples))
        b = forward_pairs(model, data.collate(examples))
    torch.testing.assert_close(b.sum_logps, a.sum_logps, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("packing", [False, True])
def test_sft_padding_free_matches_padded(packing):
    from alignctl.algos.sft import SFTAlgorithm

    job = compose_job(["recipe=smoke/sft", "precision=fp32", f"algo.packing={str(packing).lower()}"])
    tokenizer = load_tokenizer(job.model)
    algorithm = SFTAlgorithm(job.algo)
    data = algorithm.prepare_data(job, tokenizer)
    padded_collate = data.collate
    model = algorithm.build_model(job, tokenizer)
    algorithm.setup(job, CPU, model, data)
    assert any(k == "padding-free" and v.startswith("on") for k, v in data.notes)
    examples = data.train[:4]
    padded, free = padded_collate(examples), data.collate(examples)
    assert free["input_ids"].shape[0] == 1 and "attention_mask" not in free
    loss_a, _, grads_a = loss_and_grads(algorithm, model, padded)
    loss_b, _, grads_b = loss_and_grads(algorithm, model, free)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6)


def test_bucketed_length_bounds_the_lengths_the_kernel_sees():
    from alignctl.models.varlen import bucketed_length

    assert [bucketed_length(n) for n in (1, 64, 65, 180, 257, 1000, 1025, 3000)] == [64, 64, 128, 192, 320, 1024, 1280, 3072]
    lengths = {bucketed_length(n) for n in range(1, 4097)}
    assert len(lengths) == 20  # 64 apart up to 512, then at most 8 an octave
    assert all(0 <= bucketed_length(n) - n < max(64, n / 4) for n in range(1, 4097))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("inputs", ["bf16", "fp32 under autocast"])
def test_bucketed_half_attention_equals_the_exact_length_kernel(causal, inputs, monkeypatch):
    """On a CPU in bf16 (bf16 inputs, or fp32 ones that autocast casts: rotary embeddings promote
    queries to fp32) each sequence is zero-padded to a bucketed length, as torch keeps a compiled
    kernel per length; real queries must get what the unpadded call gives, and so must the
    gradients."""
    from alignctl.models import varlen

    seen = []
    monkeypatch.setattr(varlen, "bucketed_length", lambda n: seen.append(n) or 128)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if inputs == "bf16" else torch.float32
    q = torch.randn(1, 4, 90, 16, dtype=dtype, requires_grad=True)
    k = torch.randn(1, 2, 90, 16, dtype=dtype, requires_grad=True)
    v = torch.randn(1, 2, 90, 16, dtype=dtype, requires_grad=True)
    weights = torch.randn(1, 4, 90, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=inputs != "bf16"):
        exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        bucketed = varlen._sequence_attention(q, k, v, causal, 0.0, None, True)
    assert seen == [90]  # the bucketed path ran
    assert bucketed.shape == exact.shape and bucketed.dtype == exact.dtype
    torch.testing.assert_close(bucketed.float(), exact.float(), rtol=1e-2, atol=1e-2)
    grads = [torch.autograd.grad((out.float() * weights).sum(), (q, k, v)) for out in (exact, bucketed)]
    for a, b in zip(*grads):
        torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-2)


def test_fp32_attention_keeps_exact_lengths(monkeypatch):
    from alignctl.models import varlen

    monkeypatch.setattr(varlen, "bucketed_length", lambda n: pytest.fail("fp32 attention was padded"))
    q = torch.randn(1, 2, 10, 8)
    assert varlen._sequence_attention(q, q, q, True, 0.0, None, False).shape == q.shape
