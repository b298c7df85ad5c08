"""Every run ends with PNG plots of its metrics; `alignctl plot` overlays runs; plotting never fails a run."""

import json

import pytest

from alignctl.cli import main
from alignctl.plots import panel_series
from alignctl.tracking import read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUIET = ["train.max_steps=2", "train.logging_steps=1", "train.save_steps=0", "run.progress=false"]

# recipe (with extra overrides) -> panels that must be drawn, and series that must be in them
FAMILIES = {
    "dpo": ([], {"loss": {"train loss", "eval loss"}, "lr": {"train lr"},
                 "rewards_margins": {"train rewards/margins", "eval rewards/margins"},
                 "accuracy": {"train rewards/accuracies", "eval rewards/accuracies"},
                 "rewards": {"train rewards/chosen", "train rewards/rejected"}}),
    "sft": (["run.sample_prompts=0"], {"loss": {"train loss", "eval loss"}, "lr": {"train lr"}}),
    "kto": (["run.sample_prompts=0"], {"loss": {"train loss", "eval loss"}, "kl": {"train kl", "eval kl"},
                                       "rewards": {"train rewards/chosen", "train rewards/rejected"}}),
    "reward": ([], {"loss": {"train loss", "eval loss"}, "accuracy": {"train accuracy", "eval accuracy"},
                    "rewards_margins": {"train rewards/margins"}}),
    "grpo": (["algo.beta=0.04", "algo.loss_type=grpo"],
             {"loss": {"train loss"}, "reward": {"train reward"}, "kl": {"train kl"}, "entropy": {"train entropy"},
              "completion_length": {"train completions/mean_length"}}),
}


def check_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC, path
    pixels = matplotlib.image.imread(str(path))
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 0  # something was drawn


@pytest.mark.parametrize("recipe", list(FAMILIES))
def test_every_family_ends_with_plots_of_its_main_metrics(tmp_path, recipe):
    extra, expected = FAMILIES[recipe]
    out = tmp_path / recipe
    assert main(["train", f"recipe=smoke/{recipe}", *QUIET, *extra, f"run.output_dir={out}"]) == 0
    panels = panel_series({out.name: read_metrics(out)})
    for panel, series in expected.items():
        assert panel in panels and series <= set(panels[panel]), (panel, sorted(panels.get(panel, {})))
        check_png(out / "plots" / f"{panel}.png")
    check_png(out / "plots" / "overview.png")
    assert sorted(p.stem for p in (out / "plots").glob("*.png")) == sorted([*panels, "overview"])
    assert (out / "summary.json").exists() and (out / "console.log").exists()
    assert json.loads((out / "summary.json").read_text())["rows"]["plots"] == str(out / "plots")


def test_plot_command_overlays_runs(tmp_path, capsys):
    runs = []
    for lr in ("1e-3", "1e-2"):
        out = tmp_path / f"lr{lr}"
        assert main(["train", "recipe=smoke/dpo", *QUIET, "train.eval_steps=0", "run.sample_prompts=0",
                     f"train.lr={lr}", f"run.output_dir={out}"]) == 0
        runs.append(out)
    compare = tmp_path / "compare"
    assert main(["plot", *map(str, runs), "--out", str(compare)]) == 0
    assert f"into {compare}" in " ".join(capsys.readouterr().err.split())
    panels = panel_series({r.name: read_metrics(r) for r in runs})
    assert {"lr1e-3: train loss", "lr1e-2: train loss"} <= set(panels["loss"])
    for name in ("overview", "loss", "lr", "rewards_margins"):
        check_png(compare / f"{name}.png")
    # one run: its own plots folder again
    (runs[0] / "plots" / "loss.png").unlink()
    assert main(["plot", str(runs[0])]) == 0
    check_png(runs[0] / "plots" / "loss.png")
    # an --out that cannot be a folder is one clear line, not a traceback
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["plot", str(runs[0]), "--out", str(blocker / "plots")]) == 2
    assert "cannot write into" in capsys.readouterr().err


def test_plot_command_refuses_a_folder_that_is_no_run(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl there" in capsys.readouterr().err
    assert main(["plot", "--out"]) == 2


def test_a_plotting_failure_is_a_warning_not_a_failed_run(tmp_path, monkeypatch, capsys):
    import alignctl.plots

    def broken(run_dir):
        raise RuntimeError("no fonts here")

    monkeypatch.setattr(alignctl.plots, "write_run_plots", broken)
    out = tmp_path / "run"
    assert main(["train", "recipe=smoke/sft", *QUIET, "train.eval_steps=0", f"run.output_dir={out}"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "warning: plots were not written (no fonts here)" in err
    assert (out / "final_model").is_dir() and not (out / "plots").exists()
    assert "plots were not written" in (out / "console.log").read_text()
