"""Runs survive being stopped: exact resume, SIGKILL, SIGTERM, interrupted saves, full disks, NaN."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from alignctl.checkpoint import list_checkpoints, save_checkpoint
from alignctl.cli import main
from alignctl.errors import AlignctlError
from alignctl.tracking import read_metrics
from conftest import ROOT

RUN = ["train", "recipe=smoke/sft", "train.logging_steps=1", "train.eval_steps=0", "run.progress=false"]


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if r["split"] == "train"]


def start(args):
    env = dict(os.environ, COLUMNS="200")
    return subprocess.Popen([sys.executable, "-m", "alignctl.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(run_dir, name, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "checkpoints" / name / "trainer_state.json").exists():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint {name} within {timeout}s")


def kill_at_checkpoint_then_resume(args, run_dir, checkpoint):
    """Start ``args`` into ``run_dir``, SIGKILL it once ``checkpoint`` is complete, then resume it
    in-process to the end (asserting it had not finished before the kill)."""
    proc = start(args + [f"run.output_dir={run_dir}"])
    wait_for_checkpoint(run_dir, checkpoint, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "final_model").exists(), "the run finished before it could be killed"
    assert main(args + [f"run.output_dir={run_dir}", "resume=auto"]) == 0


def test_sigkill_then_resume_logs_exactly_the_uninterrupted_losses(tmp_path):
    steps = ["train.max_steps=150", "train.save_steps=5"]
    assert main(RUN + steps + [f"run.output_dir={tmp_path / 'whole'}"]) == 0

    killed = tmp_path / "killed"
    proc = start(RUN + steps + [f"run.output_dir={killed}"])
    wait_for_checkpoint(killed, "step-0000005", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final_model").exists(), "the run finished before it could be killed"
    assert main(RUN + steps + [f"run.output_dir={killed}", "resume=auto"]) == 0
    assert losses(killed) == losses(tmp_path / "whole")


def test_sigterm_checkpoints_and_exits_nonzero_then_resumes(tmp_path):
    steps = ["train.max_steps=400", "train.save_steps=5"]
    run_dir = tmp_path / "run"
    proc = start(RUN + steps + [f"run.output_dir={run_dir}"])
    wait_for_checkpoint(run_dir, "step-0000005", proc)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped by SIGTERM" in err and "resume=auto" in err and "Traceback" not in err
    stopped_at = int(list_checkpoints(run_dir)[-1].name.split("-")[1])
    assert stopped_at >= 5 and not (run_dir / "final_model").exists()
    assert max(step for step, _ in losses(run_dir)) == stopped_at
    # and it continues to the end from there
    assert main(RUN + ["train.max_steps=" + str(stopped_at + 3), "train.save_steps=5", f"run.output_dir={run_dir}",
                       "resume=auto"]) == 0
    assert [s for s, _ in losses(run_dir)][-1] == stopped_at + 3


def test_interrupted_save_leaves_previous_checkpoint_usable(tmp_path):
    def good(folder):
        (folder / "weights").write_text("ok")

    save_checkpoint(tmp_path, 5, good, {}, keep=1)

    def crash(folder):
        (folder / "weights").write_text("half")
        raise KeyboardInterrupt  # the process dies mid-save

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 10, crash, {}, keep=1)
    found = list_checkpoints(tmp_path)
    assert [p.name for p in found] == ["step-0000005"] and (found[0] / "weights").read_text() == "ok"
    # a temporary folder left by a SIGKILL mid-save is never taken for a checkpoint
    (tmp_path / "checkpoints" / ".tmp-step-0000015-1234").mkdir()
    (tmp_path / "checkpoints" / "step-0000020").mkdir()  # renamed without state: incomplete
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000005"]


def test_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 5, lambda folder: (folder / "weights").write_text("ok"), {}, keep=None)

    def no_space(folder):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(AlignctlError, match="no space left on the device"):
        save_checkpoint(tmp_path, 10, no_space, {}, keep=None)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000005"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def poison_loss_at(monkeypatch, calls):
    from alignctl.algos.sft import SFTAlgorithm

    original = SFTAlgorithm.compute_loss
    count = {"n": 0}

    def compute_loss(self, model, batch, train):
        loss, metrics = original(self, model, batch, train)
        if train:
            count["n"] += 1
            if count["n"] in calls:
                loss = loss * float("nan")
        return loss, metrics

    monkeypatch.setattr(SFTAlgorithm, "compute_loss", compute_loss)


def test_nonfinite_loss_stops_with_step_rows_and_checkpoint(tmp_path, monkeypatch, capsys):
    poison_loss_at(monkeypatch, {4})
    code = main(RUN + ["train.max_steps=6", "train.save_steps=2", f"run.output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "non-finite loss (nan) at step 4" in err and "batch rows [" in err
    assert "step-0000002" in err and "train.skip_nonfinite=true" in err


def test_nonfinite_batches_can_be_skipped_and_counted(tmp_path, monkeypatch):
    poison_loss_at(monkeypatch, {2, 3})
    assert main(RUN + ["train.max_steps=5", "train.save_steps=0", "train.skip_nonfinite=true", f"run.output_dir={tmp_path}"]) == 0
    records = [r for r in read_metrics(tmp_path) if r["split"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[-1]["skipped_nonfinite"] == 2
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    assert main(RUN + [f"run.output_dir={tmp_path}", "resume=auto"]) == 2
