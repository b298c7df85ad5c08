"""DDPO as a user runs it: the plain command on the tiny pipeline, learning, DDP, and sd15 offline."""

from alignctl.cli import main
from alignctl.tracking import read_metrics
from conftest import run_cli

QUIET = ["run.progress=false"]


def test_the_plain_command_runs_on_the_tiny_pipeline(tmp_path):
    args = ["train", "algo=ddpo", "model=tiny_sd", "reward=jpeg_compressibility", "dataset=smoke_image_prompts",
            "algo.sample_num_steps=4", "train.max_steps=1", *QUIET, f"run.output_dir={tmp_path}"]
    assert main(args) == 0
    record = read_metrics(tmp_path)[0]
    assert {"reward_mean", "reward_std", "loss", "approx_kl", "clipfrac", "images_per_s"} <= set(record)
    assert (tmp_path / "samples").is_dir() and (tmp_path / "final_model").is_dir()


def test_learning_raises_jpeg_compressibility(tmp_path):
    """Seeded, full UNet, 32 px, 4 denoising steps: the mean reward of the last 4 steps clearly
    beats the first 4 (rewards are minus the JPEG size in kB, about -1.5 here)."""
    args = ["train", "recipe=smoke/ddpo", "train.max_steps=12", "algo.use_lora=false", "train.lr=1e-2",
            "algo.sample_batch_size=4", "algo.train_batch_size=4", *QUIET, f"run.output_dir={tmp_path}"]
    assert main(args) == 0
    rewards = [r["reward_mean"] for r in read_metrics(tmp_path)]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.05, (first, last)


def test_ddp_on_two_cpu_processes_runs(tmp_path):
    result = run_cli("train", "recipe=smoke/ddpo", "train.max_steps=2", *QUIET, "launcher=ddp",
                     "launcher.num_processes=2", "launcher.main_process_port=0", f"run.output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stderr.count("alignctl run summary") == 1
    assert "(2 process(es))" in result.stderr
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_sd15_offline_is_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["train", "algo=ddpo", "model=sd15", "reward=jpeg_compressibility", "dataset=smoke_image_prompts",
            *QUIET, f"run.output_dir={tmp_path}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot load the diffusion pipeline 'stable-diffusion-v1-5/stable-diffusion-v1-5'" in err
    assert "Traceback" not in err


def test_a_text_file_of_prompts(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n\na blue sphere\n")
    out = tmp_path / "run"
    assert main(["train", "recipe=smoke/ddpo", f"dataset.path={prompts}", "train.max_steps=1", *QUIET,
                 f"run.output_dir={out}"]) == 0
    assert read_metrics(out)[0]["step"] == 1
