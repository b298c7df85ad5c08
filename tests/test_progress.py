"""What a run shows and leaves behind: plain progress lines, throughput, evaluation splits and caps,
sample generations, summary.json, console.log, timestamps, trackers, checkpoint limits."""

import importlib.machinery
import importlib.util
import json
import re
import sys
import time
import types

import pytest

from alignctl.cli import main
from alignctl.config import DatasetConfig, TrainConfig
from alignctl.data.load import AUTO_EVAL_MIN_ROWS, load_rows
from alignctl.tracking import read_metrics
from conftest import run_cli

LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)  step (\d+)/(\d+)  loss \S+  lr \S+  ([\d,.]+) tok/s  eta \S+$")
QUICK = ["train.save_steps=0", "train.eval_steps=0"]


def progress_lines(text):
    return [m for m in (LINE.match(line.strip()) for line in text.splitlines()) if m]


def summary_row(text, name):
    match = re.search(rf"│ {re.escape(name)}\s+│ (.+?)\s+│", text)
    return match.group(1) if match else None


def test_redirected_output_gets_one_timestamped_line_per_logging_step(tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "recipe=smoke/sft", "train.max_steps=5", "train.logging_steps=2", *QUICK,
                     f"run.output_dir={out}")
    assert result.returncode == 0, result.stderr
    lines = progress_lines(result.stderr)
    assert [int(m.group(2)) for m in lines] == [1, 2, 4, 5]  # first, every 2nd, last
    assert all(m.group(3) == "5" for m in lines)
    stamps = [time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) for m in lines]
    assert stamps == sorted(stamps) and abs(stamps[-1] - time.time()) < 600
    # the summary's tokens/s is the last progress figure (one definition: tokens / training seconds)
    shown = summary_row(result.stderr, "tokens/s")
    assert shown is not None and shown.split()[0] == lines[-1].group(4)
    summary = json.loads((out / "summary.json").read_text())
    assert f"{summary['units_per_s']:,.1f}" == lines[-1].group(4)
    phases = summary["phase_s"]
    assert set(phases) == {"setup", "train", "eval", "save", "finish"} and summary["wall_s"] >= sum(phases.values()) - 0.5
    assert summary["units"] > 0 and summary["rows"]["tokens/s"].startswith(lines[-1].group(4))
    # console.log holds the same lines and the summary
    log = (out / "console.log").read_text()
    assert [m.group(0) for m in progress_lines(log)] == [m.group(0) for m in lines]
    assert "alignctl run summary" in log
    # every metrics row has a wall-clock timestamp
    records = read_metrics(out)
    assert records and all(abs(r["timestamp"] - time.time()) < 600 for r in records)


def test_progress_false_keeps_the_console_quiet_but_writes_console_log(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "recipe=smoke/sft", "train.max_steps=3", "train.logging_steps=1", *QUICK,
                 "run.progress=false", f"run.output_dir={out}"]) == 0
    assert not progress_lines(capsys.readouterr().err)
    assert [int(m.group(2)) for m in progress_lines((out / "console.log").read_text())] == [1, 2, 3]


def test_summary_tokens_per_s_matches_the_training_time(tmp_path):
    """tokens/s = tokens trained / seconds in training steps (evaluation and saving left out)."""
    out = tmp_path / "run"
    assert main(["train", "recipe=smoke/dpo", "train.max_steps=4", "train.logging_steps=2", "train.eval_steps=2",
                 "train.save_steps=2", "run.progress=false", f"run.output_dir={out}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    tokens, train_s = summary["units"], summary["phase_s"]["train"]
    assert summary["units_per_s"] == pytest.approx(tokens / train_s, rel=1e-9)
    assert summary["phase_s"]["eval"] > 0 and summary["phase_s"]["save"] > 0


def test_small_files_keep_every_row_unless_a_split_is_asked_for(tmp_path):
    data = tmp_path / "small.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}?", "completion": f" a{i}."}) + "\n" for i in range(20)))
    out = tmp_path / "run"
    assert main(["train", "algo=sft", f"dataset.path={data}", "train.max_steps=2", *QUICK, "run.progress=false",
                 f"run.output_dir={out}"]) == 0
    assert not [r for r in read_metrics(out) if r["split"] == "eval"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_examples"] == 20 and summary["eval_examples"] == 0
    assert summary["rows"]["train / eval examples"].startswith("20 / 0 (eval: none (20 rows < 2000")


def test_auto_eval_split_only_for_large_data(tmp_path):
    def rows(n):
        path = tmp_path / f"{n}.jsonl"
        path.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(n)))
        return load_rows(DatasetConfig(name="x", path=str(path)), seed=0)

    small, large = rows(AUTO_EVAL_MIN_ROWS - 1), rows(AUTO_EVAL_MIN_ROWS)
    assert small.eval is None and len(small.train) == AUTO_EVAL_MIN_ROWS - 1 and "nothing held out" in small.eval_origin
    assert len(large.eval) == 100 and len(large.train) == AUTO_EVAL_MIN_ROWS - 100
    asked = load_rows(DatasetConfig(name="x", path=str(tmp_path / "1999.jsonl"), eval_fraction=0.1), seed=0)
    assert len(asked.eval) == 200
    none = load_rows(DatasetConfig(name="x", path=str(tmp_path / "2000.jsonl"), eval_fraction=0.0), seed=0)
    assert none.eval is None and len(none.train) == AUTO_EVAL_MIN_ROWS


def test_eval_cap_limits_each_evaluation(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "recipe=smoke/dpo", "train.max_steps=2", "train.eval_steps=1", "train.save_steps=0",
                 "dataset.max_eval_rows=2", "train.per_device_eval_batch_size=1", "run.sample_prompts=0",
                 f"run.output_dir={out}"]) == 0
    log = (out / "console.log").read_text()
    assert log.count("eval @ step 1: 2 batches") == 1 and log.count("eval @ step 2: 2 batches") == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_examples"] == 2
    assert summary["rows"]["train / eval examples"] == (
        "36 / 2 (eval: dataset.eval_fraction=0.1 of 40 rows, its first 2 rows (dataset.max_eval_rows))")


def test_samples_are_generated_at_each_evaluation(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "recipe=smoke/sft", "train.max_steps=4", "train.eval_steps=2", "train.save_steps=0",
                 "generation.max_new_tokens=6", "run.progress=false", f"run.output_dir={out}"]) == 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2, 2, 2, 4, 4, 4]  # 3 eval prompts at steps 2 and 4 (the end)
    assert all(s["prompt"] and isinstance(s["completion"], str) and s["score"] is None for s in samples)
    assert "samples @ step 2 (the first 3 eval prompts)" in capsys.readouterr().err
    assert "samples @ step 4" in (out / "console.log").read_text()

    own = tmp_path / "own"
    assert main(["train", "recipe=smoke/kto", "train.max_steps=1", "train.save_steps=0", "generation.max_new_tokens=4",
                 'run.sample_prompts=["Capital of Peru?"]', "run.progress=false", f"run.output_dir={own}"]) == 0
    samples = [json.loads(line) for line in (own / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["prompt"]) for s in samples] == [(1, "Capital of Peru?")]

    off = tmp_path / "off"
    assert main(["train", "recipe=smoke/sft", "train.max_steps=1", *QUICK, "run.sample_prompts=0",
                 "run.progress=false", f"run.output_dir={off}"]) == 0
    assert not (off / "samples.jsonl").exists()


@pytest.mark.parametrize("args, message", [
    (["recipe=smoke/reward", "run.sample_prompts=2"], "algo=reward trains a scorer"),
    (["recipe=smoke/grpo", "run.sample_prompts=2"], "algo.sample_every"),
    (["recipe=smoke/sft", "run.sample_prompts=-1"], "run.sample_prompts=-1: must be >= 0"),
    (["recipe=smoke/sft", "run.sample_prompts=[1,2]"], "every prompt must be a non-empty string"),
    (["recipe=smoke/sft", "run.report_to=[neptune]"], "unknown tracker 'neptune'"),
])
def test_bad_run_output_settings_are_one_clear_line(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert main(["train", *args, f"run.output_dir={out}"]) == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert not out.exists()


def test_missing_tracker_package_is_one_clear_line_before_anything_is_written(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    out = tmp_path / "run"
    assert main(["train", "recipe=smoke/sft", "run.report_to=[tensorboard,wandb]", f"run.output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "run.report_to includes wandb, but the wandb package is not installed" in err
    assert 'pip install "alignctl[wandb]"' in " ".join(err.split()) and "Traceback" not in err
    assert not out.exists()


def test_report_to_tensorboard_and_wandb_through_accelerate(tmp_path, monkeypatch):
    """TensorBoard for real; wandb as a stand-in module recording what accelerate's tracker sends it."""
    calls = {"init": [], "config": {}, "log": [], "finish": 0}

    class Run:
        def log(self, values, step=None, **kwargs):
            calls["log"].append((step, dict(values)))

        def finish(self):
            calls["finish"] += 1

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kwargs: calls["init"].append(kwargs) or Run()
    fake.config = types.SimpleNamespace(update=lambda values, **kw: calls["config"].update(values))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    assert main(["train", "recipe=smoke/sft", "train.max_steps=2", "train.logging_steps=1", "train.eval_steps=0",
                 "train.save_steps=0", "run.report_to=[tensorboard,wandb]", "run.progress=false",
                 f"run.output_dir={out}"]) == 0
    assert calls["init"][0]["dir"] == str(out) and calls["init"][0]["project"] == "alignctl"
    assert calls["config"]["train.max_steps"] == 2 and calls["finish"] == 1
    logged = {step: values for step, values in calls["log"]}
    assert {1, 2} <= set(logged) and "train/loss" in logged[1] and "eval/loss" in logged[2]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]


def test_checkpoints_are_limited_to_three_by_default(tmp_path):
    assert TrainConfig().save_total_limit == 3
    out = tmp_path / "run"
    assert main(["train", "recipe=smoke/sft", "train.max_steps=5", "train.save_steps=1", "train.eval_steps=0",
                 "run.progress=false", f"run.output_dir={out}"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000003", "step-0000004"]


def test_report_to_mlflow_writes_a_file_store_in_the_run_dir(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")  # the optional extra alignctl[mlflow]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    assert main(["train", "recipe=smoke/sft", "train.max_steps=2", "train.logging_steps=1", *QUICK,
                 "run.sample_prompts=0", "run.report_to=[mlflow]", "run.progress=false", f"run.output_dir={out}"]) == 0
    losses = list((out / "mlruns").glob("*/*/metrics/train/loss"))
    assert len(losses) == 1 and len(losses[0].read_text().splitlines()) == 2
