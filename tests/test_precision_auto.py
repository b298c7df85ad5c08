"""precision=auto (the default) and the reference model's dtype under mixed precision."""

import pytest
import torch

from alignctl import precision
from alignctl.compose import compose_job
from alignctl.models.load import load_tokenizer
from alignctl.models.policy import build_policy
from alignctl.models.reference import ReferenceModel


@pytest.fixture
def machine(monkeypatch):
    """Pretend hardware: set .gpu (a bf16 GPU's name or None), .cuda, .flags (CPU bf16 flags)."""
    state = type("Machine", (), {"gpu": None, "cuda": False, "flags": ()})()
    monkeypatch.setattr(precision, "cuda_bf16", lambda: state.gpu)
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: state.flags)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: state.cuda)
    return state


def test_auto_picks_bf16_on_a_bf16_gpu(machine):
    machine.gpu, machine.cuda = "NVIDIA H100", True
    assert precision.choose_precision() == ("bf16", "auto: CUDA GPU with bf16 (NVIDIA H100)")
    assert precision.choose_precision(arch_width=64)[0] == "bf16"  # a GPU pays for any width


def test_auto_stays_fp32_on_a_gpu_without_bf16(machine):
    machine.cuda = True
    assert precision.choose_precision() == ("fp32", "auto: this CUDA GPU has no bf16")


@pytest.mark.parametrize("flags", [("avx512_bf16",), ("amx_bf16",), ("avx512_bf16", "amx_bf16")])
def test_auto_picks_bf16_on_a_cpu_with_native_bf16(machine, flags):
    machine.flags = flags
    name, reason = precision.choose_precision()
    assert name == "bf16" and all(f in reason for f in flags)


def test_auto_stays_fp32_on_a_plain_cpu_or_for_a_tiny_model(machine):
    name, reason = precision.choose_precision()
    assert name == "fp32" and "without native bf16" in reason
    machine.flags = ("avx512_bf16",)
    name, reason = precision.choose_precision(arch_width=64)
    assert name == "fp32" and "width 64" in reason
    assert precision.choose_precision(arch_width=256)[0] == "bf16"


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile\n")
    assert precision.cpu_bf16_flags(info) == ("avx512_bf16",)
    info.write_text("flags\t\t: fpu sse2 avx2\n")
    assert precision.cpu_bf16_flags(info) == ()
    assert precision.cpu_bf16_flags(tmp_path / "missing") == ()


def test_the_composed_config_records_the_choice(machine):
    machine.flags = ("amx_bf16",)
    job = compose_job(["algo=dpo", "model=tiny", "model.arch.hidden_size=256"])
    assert job.precision.name == "bf16" and "amx_bf16" in job.precision.auto_reason
    job = compose_job(["algo=dpo", "model=tiny"])
    assert job.precision.name == "fp32" and "width 64" in job.precision.auto_reason
    job = compose_job(["algo=dpo", "model=tiny", "precision=bf16"])  # an explicit preset is kept as is
    assert job.precision.name == "bf16" and job.precision.auto_reason is None
    job = compose_job(["recipe=smoke/ddpo"])  # DDPO's built-in tiny pipeline is as small as the tiny LM
    assert job.precision.name == "fp32" and "width 32" in job.precision.auto_reason


@pytest.mark.parametrize("name,dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_reference_copy_is_held_in_the_half_type_under_mixed_precision(name, dtype):
    job = compose_job(["recipe=smoke/dpo", f"precision={name}"])
    tokenizer = load_tokenizer(job.model)
    policy = build_policy(job, tokenizer)
    reference = ReferenceModel.build(job, policy, tokenizer, reference_free=False)
    assert {p.dtype for p in reference.model.parameters()} == {dtype}
    assert {p.dtype for p in policy.parameters()} == {torch.float32}  # master weights stay fp32
    # built parameter by parameter in the half type: the policy's values rounded once, nothing shared
    for (name, held), start in zip(reference.model.named_parameters(), policy.parameters()):
        assert torch.equal(held, start.detach().to(dtype)) and held.data_ptr() != start.data_ptr(), name
    tied = lambda m: m.get_output_embeddings().weight is m.get_input_embeddings().weight  # noqa: E731
    assert tied(reference.model) == tied(policy)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "seq_lengths": torch.tensor([5])}
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if name == "bf16" else None
    ref = reference.sum_logps(batch, **({"autocast": autocast} if autocast else {}))
    assert ref.dtype == torch.float32 and not ref.is_inference()  # usable in a loss with autograd
    weight = torch.ones(1, requires_grad=True)
    (weight * ref).sum().backward()
    assert weight.grad is not None
