"""Bad input to `alignctl train`, table-driven: each case is one clear line (exit code 2, the key or
folder named, no traceback) or the right behaviour, and nothing of an earlier run is lost.

Every case runs in-process through ``alignctl.cli.main``. Cases that need a run directory copy one
small SFT run made once per module (checkpoints at steps 2 and 4 of 6).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

from alignctl.checkpoint import CHECKPOINT_DIR, OLD_PREFIX, remove_leftovers, write_atomically
from alignctl.cli import main
from alignctl.tracking import read_metrics

RUN = ["train", "recipe=smoke/sft", "train.logging_steps=1", "train.eval_steps=0", "run.progress=false"]
BASE = RUN + ["train.max_steps=6", "train.save_steps=2"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A finished SFT run with checkpoints step-2 and step-4."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    assert main(BASE + [f"run.output_dir={run_dir}"]) == 0
    return run_dir


def interrupted(base: Path, where: Path) -> Path:
    """A copy of the base run as if killed after its step-4 checkpoint (no final model)."""
    shutil.copytree(base, where)
    shutil.rmtree(where / "final_model")
    return where


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINT_DIR / f"step-{step:07d}"


def snapshot(folder: Path) -> Dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def poison(monkeypatch, transform: Callable) -> None:
    """Wrap SFT's training loss: ``transform(loss, call_number)``."""
    from alignctl.algos.sft import SFTAlgorithm

    original, calls = SFTAlgorithm.compute_loss, {"n": 0}

    def compute_loss(self, model, batch, train):
        loss, metrics = original(self, model, batch, train)
        if train:
            calls["n"] += 1
            loss = transform(loss, calls["n"])
        return loss, metrics

    monkeypatch.setattr(SFTAlgorithm, "compute_loss", compute_loss)


def always_nan(loss, _n):
    return loss * float("nan")


def nan_then_sigterm(loss, n):
    if n == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return loss * float("nan")


def uniform(loss, _n):
    return loss * 0 + math.log(512)  # the tiny model's vocabulary: uniform predictions


# ------------------------------------------------------------------------------------ set-ups
# Each takes (tmp_path, base_run) and returns the values substituted into the case's args.
def out_only(tmp, base):
    return {"out": tmp / "run"}


def a_file(tmp, base):
    (tmp / "file").write_text("not a folder")
    return {"out": tmp / "file"}


def under_a_file(tmp, base):
    (tmp / "file").write_text("not a folder")
    return {"out": tmp / "file" / "run"}


def read_only(tmp, base):
    (tmp / "ro").mkdir()
    os.chmod(tmp / "ro", 0o500)
    return {"out": tmp / "ro" / "run"}


def users_folder(tmp, base):
    (tmp / "mine").mkdir()
    (tmp / "mine" / "config.yaml").write_text("my: own config\n")
    (tmp / "mine" / "metrics.jsonl").write_text('{"my": 1}\n')
    return {"out": tmp / "mine"}


def stopped(tmp, base):
    return {"out": interrupted(base, tmp / "run"), "ckpt": step_dir(tmp / "run", 4)}


def finished(tmp, base):
    shutil.copytree(base, tmp / "run")
    return {"out": tmp / "run"}


def empty_dir(tmp, base):
    (tmp / "run").mkdir()
    return {"out": tmp / "run"}


def sft_checkpoint(tmp, base):
    return {"out": tmp / "new", "ckpt": step_dir(base, 4)}


def break_newest(change: Callable[[Path], None]):
    def setup(tmp, base):
        run_dir = interrupted(base, tmp / "run")
        change(step_dir(run_dir, 4))
        return {"out": run_dir, "ckpt": step_dir(run_dir, 4)}

    return setup


def bad_json(folder):
    (folder / "trainer_state.json").write_text('{"step": 4, "progr')


def truncate_optimizer(folder):
    data = (folder / "optimizer.pt").read_bytes()
    (folder / "optimizer.pt").write_bytes(data[: len(data) // 2])


def drop_weights(folder):
    (folder / "trainable.safetensors").unlink()


def scramble_optimizer(folder):  # same size, so only loading it can tell
    size = (folder / "optimizer.pt").stat().st_size
    (folder / "optimizer.pt").write_bytes(os.urandom(size))


def other_run(folder):
    state = json.loads((folder / "trainer_state.json").read_text())
    (folder / "trainer_state.json").write_text(json.dumps({**state, "run_id": "someone-else"}))


def all_broken(tmp, base):
    run_dir = interrupted(base, tmp / "run")
    for step in (2, 4):
        bad_json(step_dir(run_dir, step))
    return {"out": run_dir}


def partial_metrics(tmp, base):
    run_dir = interrupted(base, tmp / "run")
    with (run_dir / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 5, "split": "tr')  # killed mid-write
    return {"out": run_dir}


def leftover_tmp(tmp, base):
    run_dir = interrupted(base, tmp / "run")
    (run_dir / CHECKPOINT_DIR / ".tmp-step-0000006-4242").mkdir()
    (run_dir / ".tmp-final_model-4242").mkdir()
    return {"out": run_dir}


# ------------------------------------------------------------------------------------ the table
@dataclass
class Case:
    id: str
    args: List[str]
    code: int
    message: str  # must appear in stderr (whitespace-normalised)
    setup: Callable = out_only
    patch: Optional[Callable] = None  # a loss transform for poison()
    env: Optional[Dict[str, str]] = None
    skip: Optional[str] = None


def bad(key_value: str, message: str, recipe: str = "smoke/sft") -> Case:
    return Case(key_value, [f"recipe={recipe}", key_value], 2, message)


ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0

CASES = [
    # --- item 4: numeric ranges and choices, refused at composition with the key's path
    bad("train.max_steps=-3", "train.max_steps=-3: must be -1 (train for train.num_epochs) or >= 1"),
    bad("train.max_steps=0", "train.max_steps=0: must be -1"),
    bad("train.num_epochs=0", "train.num_epochs=0.0: must be > 0"),
    bad("train.per_device_batch_size=0", "train.per_device_batch_size=0: must be >= 1"),
    bad("train.per_device_batch_size=-2", "train.per_device_batch_size=-2: must be >= 1"),
    bad("train.per_device_eval_batch_size=0", "train.per_device_eval_batch_size=0: must be >= 1"),
    bad("train.gradient_accumulation_steps=0", "train.gradient_accumulation_steps=0: must be >= 1"),
    bad("train.lr=-0.001", "train.lr=-0.001: must be > 0"),
    bad("train.lr=0", "train.lr=0.0: must be > 0"),
    bad("train.lr=nan", "train.lr=nan: must be > 0"),
    bad("train.warmup_ratio=5", "train.warmup_ratio=5.0: must be in [0, 1)"),
    bad("train.warmup_steps=-1", "train.warmup_steps=-1: must be >= 0"),
    bad("train.eval_steps=-1", "train.eval_steps=-1: must be >= 0"),
    bad("train.save_steps=-1", "train.save_steps=-1: must be >= 0"),
    bad("train.logging_steps=0", "train.logging_steps=0: must be >= 1"),
    bad("train.max_grad_norm=-1", "train.max_grad_norm=-1.0: must be >= 0"),
    bad("train.save_total_limit=0", "train.save_total_limit=0: must be >= 1"),
    bad("train.logps_chunk_size=0", "train.logps_chunk_size=0: must be >= 1"),
    bad("train.length_group_batches=0", "train.length_group_batches=0: must be >= 1"),
    bad("train.weight_decay=-0.1", "train.weight_decay=-0.1: must be >= 0"),
    bad("train.adam_beta1=1.0", "train.adam_beta1=1.0: must be in [0, 1)"),
    bad("train.adam_beta2=-0.5", "train.adam_beta2=-0.5: must be in [0, 1)"),
    bad("train.adam_epsilon=0", "train.adam_epsilon=0.0: must be > 0"),
    bad("train.max_consecutive_nonfinite=0", "train.max_consecutive_nonfinite=0: must be >= 1"),
    bad("dataset.eval_fraction=1.5", "dataset.eval_fraction=1.5: must be in [0, 1)"),
    bad("algo.max_length=0", "algo.max_length=0: must be >= 1"),
    bad("algo.beta=-1", "algo.beta=-1.0: must be > 0 (a negative beta learns the opposite preference)", "smoke/dpo"),
    bad("algo.beta=0", "algo.beta=0.0: must be > 0", "smoke/cpo"),
    bad("algo.beta=-0.5", "algo.beta=-0.5: must be > 0", "smoke/orpo"),
    bad("algo.beta=0", "algo.beta=0.0: must be > 0", "smoke/kto"),
    bad("algo.label_smoothing=0.7", "algo.label_smoothing=0.7: must be in [0, 0.5]", "smoke/dpo"),
    bad("algo.f_alpha_divergence_coef=inf", "algo.f_alpha_divergence_coef=inf: must be a finite number", "smoke/dpo"),
    bad("algo.alpha=nan", "algo.alpha=nan: must be a finite number (0: off)", "smoke/cpo"),
    bad("algo.max_prompt_length=0", "algo.max_prompt_length=0: must be >= 1", "smoke/dpo"),
    bad("algo.max_prompt_length=64", "algo.max_prompt_length=64 must be < algo.max_length=64", "smoke/dpo"),
    bad("algo.loss_type=sigmod", "algo.loss_type='sigmod': use one of sigmoid, hinge", "smoke/dpo"),
    bad("algo.loss_type=simpo2", "algo.loss_type='simpo2': use one of sigmoid, hinge, ipo, simpo",
        "smoke/cpo"),
    bad("algo.loss_type=kto2", "algo.loss_type='kto2': use one of kto, apo_zero_unpaired", "smoke/kto"),
    bad("algo.truncation_mode=keep_middle", "algo.truncation_mode='keep_middle': use one of keep_start, keep_end"),
    bad("train.lr_scheduler=cosin", "train.lr_scheduler='cosin': use one of constant, linear, cosine"),
    bad("precision.name=fp8", "precision.name='fp8': use one of fp32, bf16, fp16"),
    bad("peft.method=dora", "peft.method='dora': use one of none, lora, qlora"),
    bad("launcher.name=slurm", "launcher.name='slurm': use one of local, ddp, fsdp, deepspeed"),
    # --- item 6: interpolations from the environment
    bad("model.name_or_path=${oc.env:ALIGNCTL_TEST_UNSET}",
        "model.name_or_path=${oc.env:ALIGNCTL_TEST_UNSET}: environment variable ALIGNCTL_TEST_UNSET is not set"),
    Case("env-wrong-type", ["recipe=smoke/sft", "train.lr=${oc.env:ALIGNCTL_TEST_LR}"], 2,
         "train.lr=${oc.env:ALIGNCTL_TEST_LR}: cannot be resolved", env={"ALIGNCTL_TEST_LR": "fast"}),
    # --- item 8: where the run goes
    Case("output-dir-is-a-file", RUN, 2, "is a file, not a directory; set run.output_dir to a directory", a_file),
    Case("output-dir-under-a-file", RUN, 2, "cannot be created: ", under_a_file),
    Case("output-dir-unwritable", RUN + ["run.output_dir=/sys/alignctl-test-run"], 2, "is not writable (Permission denied"),
    Case("output-dir-read-only", RUN, 2, "is not writable", read_only, skip="root writes anywhere" if ROOT_USER else None),
    # --- item 3: a folder holding someone else's files
    Case("users-own-folder", RUN, 2, "is not empty and is not an alignctl run directory (it holds config.yaml, metrics.jsonl)",
         users_folder),
    # --- item 2: never mix runs
    Case("fresh-run-over-checkpoints", RUN, 2,
         "holds checkpoints of an earlier run (newest: step-0000004); continue it with resume=auto, start over with "
         "run.overwrite=true", stopped),
    Case("finished-run", RUN, 2, "already holds a finished run; choose another directory or set run.overwrite=true", finished),
    Case("resume-other-algorithm", ["recipe=smoke/dpo", "train.logging_steps=1", "run.progress=false", "resume={ckpt}"], 2,
         "was made with other settings (algo.name=sft in the checkpoint, algo.name=dpo now)", sft_checkpoint),
    Case("resume-other-peft", RUN + ["peft=lora", "resume=auto"], 2,
         "(peft.method=none in the checkpoint, peft.method=lora now); resume with the original settings", stopped),
    Case("resume-other-run-explicit", RUN + ["resume={ckpt}"], 2, "the checkpoint was made by another run (run id someone-else",
         break_newest(other_run)),
    Case("resume-shapes-differ", RUN + ["model.arch.hidden_size=32", "resume=auto"], 2,
         "does not fit this model: ", stopped),
    Case("resume-shapes-differ-message", RUN + ["model.arch.hidden_size=32", "resume=auto"], 2,
         "has shape [512, 64] in the checkpoint and [512, 32] in the model", stopped),
    Case("resume-nothing-left", RUN + ["train.max_steps=4", "resume=auto"], 2,
         "nothing left to train: the checkpoint", stopped),
    Case("resume-nothing-left-message", RUN + ["train.max_steps=3", "resume=auto"], 2,
         "is at step 4, train.max_steps=3; raise train.max_steps", stopped),
    Case("resume-without-checkpoints", RUN + ["resume=auto"], 2, "resume=auto: no usable checkpoint in", empty_dir),
    Case("resume-missing-path", RUN + ["resume={out}/nope"], 2, "/nope: cannot resume from it: no such folder", empty_dir),
    Case("resume-finished", RUN + ["resume=auto"], 2, "already finished (final_model exists); nothing to resume", finished),
    # --- item 5: damaged checkpoints: resume=auto falls back to the newest usable one
    Case("broken-trainer-state", RUN + ["train.max_steps=6", "resume=auto"], 0,
         "skipped checkpoint {out}/checkpoints/step-0000004: trainer_state.json cannot be read", break_newest(bad_json)),
    Case("truncated-optimizer", RUN + ["train.max_steps=6", "resume=auto"], 0,
         "step-0000004: optimizer.pt is truncated or damaged", break_newest(truncate_optimizer)),
    Case("missing-weights", RUN + ["train.max_steps=6", "resume=auto"], 0,
         "step-0000004: trainable.safetensors is missing", break_newest(drop_weights)),
    Case("scrambled-optimizer", RUN + ["train.max_steps=6", "resume=auto"], 0,
         "step-0000004: optimizer.pt cannot be read", break_newest(scramble_optimizer)),
    Case("scrambled-optimizer-explicit", RUN + ["train.max_steps=6", "resume={ckpt}"], 2,
         "checkpoint {ckpt} cannot be resumed from: optimizer.pt cannot be read", break_newest(scramble_optimizer)),
    Case("checkpoint-of-another-run", RUN + ["train.max_steps=6", "resume=auto"], 0,
         "step-0000004: made by another run (run id someone-else", break_newest(other_run)),
    Case("every-checkpoint-broken", RUN + ["resume=auto"], 2, "no usable checkpoint in", all_broken),
    Case("partial-metrics-line", RUN + ["train.max_steps=6", "resume=auto"], 0, "resumed from", partial_metrics),
    Case("leftover-tmp-folders", RUN + ["train.max_steps=6", "resume=auto"], 0,
         "removed {out}/checkpoints/.tmp-step-0000006-4242 (left by an interrupted save)", leftover_tmp),
    # --- item 1: non-finite losses
    Case("nonfinite-bound-default", RUN + ["train.max_steps=3", "train.skip_nonfinite=true"], 2,
         "20 batches in a row had a non-finite loss at step 1 (train.max_consecutive_nonfinite=20)", patch=always_nan),
    Case("nonfinite-bound-set", RUN + ["train.max_steps=3", "train.skip_nonfinite=true", "train.max_consecutive_nonfinite=3"],
         2, "3 batches in a row had a non-finite loss", patch=always_nan),
    Case("nonfinite-sigterm", RUN + ["train.max_steps=3", "train.skip_nonfinite=true", "train.max_consecutive_nonfinite=1000"],
         130, "stopped by SIGTERM while skipping non-finite batches at step 1", patch=nan_then_sigterm),
    # --- item 7: a loss stuck at ln(vocab)
    Case("uniform-loss-warning", RUN + ["train.max_steps=10", "train.save_steps=0"], 0,
         "has stayed at 6.2383 = ln(vocabulary size) for 10 logged steps", patch=uniform),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path, base_run, monkeypatch, capsys):
    if case.skip:
        pytest.skip(case.skip)
    for name, value in (case.env or {}).items():
        monkeypatch.setenv(name, value)
    if case.patch:
        poison(monkeypatch, case.patch)
    values = case.setup(tmp_path, base_run)
    args = [fill(a, values) for a in case.args]
    if not any(a.startswith("run.output_dir=") for a in args):
        args.append(f"run.output_dir={values['out']}")
    if args[0] != "train":
        args = ["train", *args]
    code = main(args)
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err
    assert code == case.code, err[-2000:]
    assert fill(case.message, values) in err, err[-2000:]


def fill(text: str, values: Dict[str, Path]) -> str:
    for name, value in values.items():
        text = text.replace("{" + name + "}", str(value))
    return text


# ------------------------------------------------------------------------------------ what each keeps
def test_users_folder_is_left_untouched(tmp_path, base_run):
    folder = users_folder(tmp_path, base_run)["out"]
    before = snapshot(folder)
    assert main(RUN + [f"run.output_dir={folder}"]) == 2
    assert snapshot(folder) == before


@pytest.mark.parametrize("how", [["run.overwrite=true"], ["resume=auto"]], ids=["overwrite", "resume"])
def test_failed_rerun_loses_nothing_of_the_previous_run(tmp_path, base_run, how):
    run_dir = interrupted(base_run, tmp_path / "run")
    before = snapshot(run_dir)
    args = RUN + ["train.max_steps=6", "dataset.path=/nonexistent/data.jsonl", f"run.output_dir={run_dir}", *how]
    assert main(args) == 2
    assert snapshot(run_dir) == before


def test_failed_overwrite_of_a_finished_run_loses_nothing(tmp_path, base_run):
    run_dir = finished(tmp_path, base_run)["out"]
    before = snapshot(run_dir)
    assert main(RUN + ["run.overwrite=true", f"model.name_or_path={tmp_path}/no-model", "model.arch=null",
                       f"run.output_dir={run_dir}"]) == 2
    assert snapshot(run_dir) == before


def test_overwrite_starts_a_clean_run_and_keeps_other_files(tmp_path, base_run):
    run_dir = interrupted(base_run, tmp_path / "run")
    (run_dir / "notes.txt").write_text("mine")
    old_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    assert main(RUN + ["train.max_steps=3", "train.save_steps=0", "run.overwrite=true", f"run.output_dir={run_dir}"]) == 0
    assert not (run_dir / CHECKPOINT_DIR).exists()  # the old checkpoints are gone: nothing to mix
    assert [r["step"] for r in read_metrics(run_dir) if r["split"] == "train"] == [1, 2, 3]
    assert json.loads((run_dir / "run.json").read_text())["run_id"] != old_id
    assert (run_dir / "notes.txt").read_text() == "mine"


def test_stale_checkpoints_are_never_resumed(tmp_path, base_run, monkeypatch):
    """Run A stopped with checkpoints 2 and 4; the folder is reused: a fresh run B is refused unless
    it overwrites, and after B (checkpoint 2, then a crash) resume=auto resumes B, never A's step 4."""
    run_dir = interrupted(base_run, tmp_path / "run")
    a_step4 = tmp_path / "a-step4"
    shutil.copytree(step_dir(run_dir, 4), a_step4)
    assert main(RUN + ["train.max_steps=6", f"run.output_dir={run_dir}"]) == 2
    poison(monkeypatch, lambda loss, n: always_nan(loss, n) if n == 3 else loss)
    b = RUN + ["train.max_steps=6", "train.save_steps=2", "train.seed=7", f"run.output_dir={run_dir}"]
    assert main(b + ["run.overwrite=true"]) == 2  # B stops at step 3 on a NaN
    assert [p.name for p in (run_dir / CHECKPOINT_DIR).iterdir()] == ["step-0000002"]
    shutil.copytree(a_step4, step_dir(run_dir, 4))  # A's checkpoint planted back: newer, but not B's
    monkeypatch.undo()
    assert main(b + ["resume=auto"]) == 0
    assert read_metrics(run_dir)[-1]["step"] == 6


def test_resume_after_fallback_continues_from_the_older_checkpoint(tmp_path, base_run):
    run_dir = interrupted(base_run, tmp_path / "run")
    truncate_optimizer(step_dir(run_dir, 4))
    assert main(RUN + ["train.max_steps=6", "train.save_steps=2", "resume=auto", f"run.output_dir={run_dir}"]) == 0
    expected = [(r["step"], r["loss"]) for r in read_metrics(base_run) if r["split"] == "train"]
    assert [(r["step"], r["loss"]) for r in read_metrics(run_dir) if r["split"] == "train"] == expected


def test_environment_values_stay_out_of_the_saved_config(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ALIGNCTL_TEST_SECRET", "s3cr3t-value")
    args = RUN + ["train.max_steps=1", "dataset.name=${oc.env:ALIGNCTL_TEST_SECRET}", f"run.output_dir={tmp_path / 'run'}"]
    assert main(args) == 0
    for path in (tmp_path / "run" / "config.yaml", tmp_path / "run" / "final_model" / "config.yaml"):
        text = path.read_text()
        assert "${oc.env:ALIGNCTL_TEST_SECRET}" in text and "s3cr3t-value" not in text
    capsys.readouterr()
    assert main(args + ["--cfg", "job"]) == 0
    assert "s3cr3t-value" not in capsys.readouterr().out


def test_uniform_loss_warning_is_printed_once(tmp_path, monkeypatch, capsys):
    poison(monkeypatch, uniform)
    assert main(RUN + ["train.max_steps=24", "train.save_steps=0", f"run.output_dir={tmp_path}"]) == 0
    assert capsys.readouterr().err.count("ln(vocabulary size)") == 1


# ------------------------------------------------------------------------------------ atomic saves
def test_resave_renames_before_deleting(tmp_path):
    final = tmp_path / "step-0000005"
    write_atomically(final, lambda folder: (folder / "w").write_text("old"))
    write_atomically(final, lambda folder: (folder / "w").write_text("new"))
    assert (final / "w").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["step-0000005"]


def test_resave_killed_between_renames_keeps_the_old_copy(tmp_path, monkeypatch):
    final = tmp_path / "checkpoints" / "step-0000005"
    write_atomically(final, lambda folder: (folder / "w").write_text("old"))
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the old folder was moved aside; killed before the new one moves in
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        write_atomically(final, lambda folder: (folder / "w").write_text("new"))
    monkeypatch.undo()
    assert not final.exists() and any(p.name.startswith(OLD_PREFIX) for p in final.parent.iterdir())
    assert remove_leftovers(tmp_path) == [f"restored {final} (its re-save was interrupted)"]
    assert (final / "w").read_text() == "old" and [p.name for p in final.parent.iterdir()] == ["step-0000005"]
