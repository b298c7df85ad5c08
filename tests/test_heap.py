"""train.trim_heap: glibc's free heap pages go back to the system before, during and after each backward pass."""

import ctypes

import pytest
import torch

from alignctl.compose import compose_job
from alignctl.engine import heap
from alignctl.engine.memory_plan import resident_bytes
from alignctl.errors import ConfigError

glibc = pytest.mark.skipif(heap.malloc_trim() is None, reason="the C library has no malloc_trim (not glibc)")


@glibc
def test_trimming_returns_freed_heap_pages_to_the_system():
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, count = 64 * 1024, 2048  # 128 MB in blocks small enough for the heap proper
    blocks = [libc.malloc(size) for _ in range(count)]
    for block in blocks:
        ctypes.memset(block, 1, size)  # resident
    pin = libc.malloc(size)  # above them: free() alone cannot shrink the heap's top
    for block in blocks:
        libc.free(block)
    held = resident_bytes()
    heap.malloc_trim()()
    released = held - resident_bytes()
    libc.free(pin)
    assert released > 0.8 * size * count


@glibc
def test_null_trims_on_a_cpu_only():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")  # only the device type is read
    assert callable(heap.heap_trimmer(None, cpu))
    assert heap.heap_trimmer(None, gpu) is None
    assert heap.heap_trimmer(False, cpu) is None
    assert callable(heap.heap_trimmer(True, gpu))  # asked for: host memory is trimmed anyway


def test_true_is_refused_where_the_c_library_cannot_trim(monkeypatch):
    from alignctl.validate import validate_job

    monkeypatch.setattr(heap, "malloc_trim", lambda: None)
    with pytest.raises(ConfigError, match=r"train.trim_heap=true needs glibc's malloc_trim"):
        validate_job(compose_job(["recipe=smoke/sft", "train.trim_heap=true"]))
    validate_job(compose_job(["recipe=smoke/sft"]))  # null: quietly off there


@pytest.mark.parametrize("setting, calls", [("null", 3 * (1 + 4 + 1)), ("false", 0)])
def test_the_loop_trims_before_during_and_after_each_backward(tmp_path, monkeypatch, setting, calls):
    """3 steps, each: before backward, after the gradients of 4 spaced parameters, after the step."""
    from alignctl.engine import offline
    from alignctl.registry import get_algorithm

    trims = []
    monkeypatch.setattr(offline, "heap_trimmer", lambda value, device: None if value is False else (lambda: trims.append(1)))
    job = compose_job(["recipe=smoke/sft", "train.max_steps=3", f"train.trim_heap={setting}", "run.progress=false",
                       "run.sample_prompts=0", f"run.output_dir={tmp_path / 'run'}", "train.eval_steps=0"])
    get_algorithm("sft").load_driver()(job)
    assert len(trims) == calls


def test_backward_trims_hook_evenly_spaced_parameters():
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(10)])  # 20 parameters
    calls = []
    handles = heap.trim_during_backward(model, lambda: calls.append(1), points=4)
    assert len(handles) == 4
    model(torch.ones(1, 2)).sum().backward()
    assert len(calls) == 4
    for handle in handles:
        handle.remove()
    model(torch.ones(1, 2)).sum().backward()
    assert len(calls) == 4


def test_onednn_cache_is_bounded_unless_the_environment_says(monkeypatch):
    monkeypatch.setattr(heap, "_capacity_set_here", False)
    monkeypatch.setenv(heap.ONEDNN_CACHE_VARIABLE, "7")
    assert heap.bound_onednn_cache() == ("oneDNN primitive cache", f"7 (from {heap.ONEDNN_CACHE_VARIABLE})")
    assert heap.os.environ[heap.ONEDNN_CACHE_VARIABLE] == "7"

    monkeypatch.delenv(heap.ONEDNN_CACHE_VARIABLE)
    name, value = heap.bound_onednn_cache()
    assert heap.os.environ[heap.ONEDNN_CACHE_VARIABLE] == "128"
    assert value.startswith("128 (set ")
    assert heap.bound_onednn_cache()[1] == value  # a second run in this process: still alignctl's choice
