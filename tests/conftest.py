import os
import subprocess
import sys
from pathlib import Path

import pytest

# The tests' models are tiny: one thread each is as fast, and processes that run side by side (the
# CLI in a subprocess, two DDP ranks) do not fight over the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from alignctl.models.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer(512)


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the real `alignctl` entry point in a subprocess (as a user would)."""
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "alignctl.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
