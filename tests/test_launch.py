"""launcher=ddp|fsdp|deepspeed: the accelerate config, the command, and real 2-process DDP runs on CPU."""

import shlex

import pytest
import torch
import yaml

from alignctl import launch
from alignctl.cli import main
from alignctl.compose import compose_job
from alignctl.tracking import read_metrics
from conftest import run_cli

# Four logged steps, all inside the first epoch, no eval split, no checkpoints.
EQUIVALENCE = ["train.max_steps=4", "train.logging_steps=1", "train.save_steps=0", "train.eval_steps=0",
               "dataset.eval_fraction=0", "train.seed=3", "run.progress=false"]


def accelerate_file(overrides):
    """Compose, write the launch files into run.output_dir, read the config back through accelerate."""
    from accelerate.commands.config.config_args import load_config_from_file

    job = compose_job(overrides)
    plan = launch.plan_launch(job, overrides)
    launch.write_launch_files(plan, job)
    loaded = load_config_from_file(str(plan.config_file))  # accelerate accepts every key
    return plan, yaml.safe_load(plan.config_file.read_text()), loaded


@pytest.mark.parametrize("preset", ["ddp", "fsdp", "deepspeed"])
def test_accelerate_config_of_each_preset(tmp_path, preset):
    overrides = ["recipe=smoke/dpo", f"launcher={preset}", "precision=bf16", "train.gradient_accumulation_steps=2",
                 f"run.output_dir={tmp_path}"]
    plan, config, loaded = accelerate_file(overrides)
    assert config["compute_environment"] == "LOCAL_MACHINE"
    assert config["distributed_type"] == {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed": "DEEPSPEED"}[preset]
    assert loaded.distributed_type.value == config["distributed_type"]
    assert config["mixed_precision"] == "bf16"
    assert (config["num_processes"], config["num_machines"], config["machine_rank"]) == (2, 1, 0)
    assert config["main_process_port"] == 29500 and "main_process_ip" not in config
    if preset == "fsdp":
        fsdp = config["fsdp_config"]
        assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD"
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        # taken from the tiny model's class (LlamaForCausalLM._no_split_modules), no weights loaded
        assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
        assert fsdp["fsdp_offload_params"] is False and fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    if preset == "deepspeed":
        ds = config["deepspeed_config"]
        assert (ds["zero_stage"], ds["offload_optimizer_device"], ds["offload_param_device"]) == (2, "none", "none")
        assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 1.0
    # the parent writes the config every launched process composes
    assert (tmp_path / "config.yaml").is_file()
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["run"]["output_dir"] == str(tmp_path.resolve())


def test_fsdp_and_deepspeed_options_reach_the_config(tmp_path):
    _, config, _ = accelerate_file(
        ["recipe=smoke/sft", "launcher=fsdp", "launcher.fsdp.sharding_strategy=hybrid_shard",
         "launcher.fsdp.cpu_offload=true", "launcher.fsdp.state_dict_type=sharded_state_dict",
         "launcher.fsdp.transformer_layer_cls_to_wrap=MyBlock", f"run.output_dir={tmp_path / 'f'}"]
    )
    fsdp = config["fsdp_config"]
    assert (fsdp["fsdp_sharding_strategy"], fsdp["fsdp_offload_params"], fsdp["fsdp_state_dict_type"]) == (
        "HYBRID_SHARD", True, "SHARDED_STATE_DICT")
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "MyBlock"
    _, config, _ = accelerate_file(
        ["recipe=smoke/sft", "launcher=deepspeed", "launcher.deepspeed.zero_stage=3",
         "launcher.deepspeed.offload_optimizer=true", "launcher.deepspeed.offload_params=true", "precision=fp16",
         f"run.output_dir={tmp_path / 'd'}"]
    )
    ds = config["deepspeed_config"]
    assert (ds["zero_stage"], ds["offload_optimizer_device"], ds["offload_param_device"]) == (3, "cpu", "cpu")
    assert ds["zero3_save_16bit_model"] is True and config["mixed_precision"] == "fp16"


def test_multi_node_config_and_one_command_per_machine(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["launch-cmd", "recipe=smoke/sft", "launcher=ddp", "launcher.num_processes=4", "launcher.num_machines=2",
            "launcher.main_process_ip=10.1.2.3", "launcher.main_process_port=29600", f"run.output_dir={run_dir}"]
    assert main(args) == 0
    out = capsys.readouterr()
    config = yaml.safe_load((run_dir / "accelerate_config.yaml").read_text())
    # accelerate wants num_processes over all machines
    assert (config["num_processes"], config["num_machines"], config["machine_rank"]) == (8, 2, 0)
    assert (config["main_process_ip"], config["main_process_port"]) == ("10.1.2.3", 29600)
    assert config["rdzv_backend"] == "static" and config["same_network"] is True
    lines = out.out.strip().splitlines()
    assert len(lines) == 2  # stdout: exactly the commands, machine rank 0 then 1
    for rank, line in enumerate(lines):
        words = shlex.split(line)
        assert words[:6] == ["accelerate", "launch", "--config_file", str(run_dir.resolve() / "accelerate_config.yaml"),
                             "--machine_rank", str(rank)]
        assert words[6:9] == ["-m", "alignctl.cli", "train"] and words[-1] == f"run.output_dir={run_dir.resolve()}"
    assert "machine_rank N" in out.err and "10.1.2.3:29600" in out.err


def test_launch_cmd_prints_the_exact_command(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("launch-cmd", "recipe=smoke/dpo", "launcher=ddp", "train.lr=2e-4", f"run.output_dir={run_dir}")
    assert result.returncode == 0, result.stderr
    config_file = run_dir.resolve() / "accelerate_config.yaml"
    assert result.stdout.strip() == (
        f"accelerate launch --config_file {config_file} -m alignctl.cli train recipe=smoke/dpo launcher=ddp "
        f"train.lr=2e-4 run.output_dir={run_dir.resolve()}"
    )
    assert config_file.is_file() and (run_dir / "config.yaml").is_file()
    assert not (run_dir / "metrics.jsonl").exists()  # nothing ran
    # `train ... --dry-run` is the same thing
    again = run_cli("train", "recipe=smoke/dpo", "launcher=ddp", "train.lr=2e-4", "--dry-run", f"run.output_dir={run_dir}")
    assert again.returncode == 0 and again.stdout == result.stdout


def test_child_overrides_pin_one_run_directory(tmp_path):
    job = compose_job(["launcher=ddp"])
    plan = launch.plan_launch(job, ["launcher=ddp", "run.output_dir=elsewhere"])
    assert [o for o in plan.overrides if o.startswith("run.output_dir")] == [f"run.output_dir={plan.run_dir}"]
    assert plan.run_dir.is_absolute() and plan.run_dir.name.startswith("sft-")  # runs/<algo>-<timestamp>
    assert launch.hydra_quote("/tmp/a b/c'd") == "'/tmp/a b/c\\'d'"
    quoted = compose_job([f"run.output_dir={launch.hydra_quote('/tmp/a b,c')}"])
    assert quoted.run.output_dir == "/tmp/a b,c"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["launcher=ddp", "launcher.num_machines=2"],
         "launcher.num_machines=2 needs launcher.main_process_ip"),
        (["launcher=ddp", "launcher.num_processes=1"], "launcher=ddp needs at least 2 processes"),
        (["launcher=ddp", "launcher.num_machines=2", "launcher.main_process_ip=10.0.0.1", "launcher.machine_rank=2"],
         "launcher.machine_rank=2: must be between 0 and"),
        (["launcher=fsdp", "launcher.fsdp.sharding_strategy=full"], "launcher.fsdp.sharding_strategy='full'"),
        (["launcher=deepspeed", "launcher.deepspeed.offload_params=true"], "needs launcher.deepspeed.zero_stage=3"),
        (["launcher.name=mpi"], "launcher.name='mpi': use one of local, ddp, fsdp, deepspeed"),
    ],
    ids=["multi-node-without-ip", "ddp-one-process", "machine-rank", "fsdp-strategy", "ds-offload", "name"],
)
def test_bad_launcher_settings_are_one_clear_line(tmp_path, capsys, overrides, message):
    for command in (["launch-cmd"], ["train"]):
        assert main([*command, "recipe=smoke/sft", *overrides, f"run.output_dir={tmp_path}"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "accelerate_config.yaml").exists()


def test_several_machines_through_train_need_a_shared_run_directory(capsys):
    args = ["train", "recipe=smoke/sft", "launcher=ddp", "launcher.num_machines=2", "launcher.main_process_ip=10.0.0.1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "set run.output_dir to a directory every machine shares" in err and "alignctl launch-cmd" in err


def test_launching_deepspeed_without_deepspeed_is_a_clear_error(tmp_path):
    if launch.deepspeed_available():
        pytest.skip("DeepSpeed is installed here")
    result = run_cli("train", "recipe=smoke/sft", "launcher=deepspeed", f"run.output_dir={tmp_path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert 'launcher=deepspeed needs DeepSpeed: pip install -e ".[deepspeed]"' in result.stderr
    assert "launching:" not in result.stderr
    # generating the config and the command still works without it
    printed = run_cli("launch-cmd", "recipe=smoke/sft", "launcher=deepspeed", f"run.output_dir={tmp_path}")
    assert printed.returncode == 0 and printed.stdout.startswith("accelerate launch --config_file")


def test_fsdp_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    # accelerate 1.15 builds FSDP only on GPU-type devices: on CPU its FSDP plugin raises
    # "There are currently no available devices found" in every process.
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    assert main(["train", "recipe=smoke/sft", "launcher=fsdp", f"run.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "launcher=fsdp needs CUDA GPUs" in err and "alignctl launch-cmd launcher=fsdp" in err


@pytest.mark.parametrize("recipe", ["smoke/dpo", "smoke/sft"])
def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path, recipe):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main(["train", f"recipe={recipe}", *EQUIVALENCE, "train.per_device_batch_size=8",
                 f"run.output_dir={single}"]) == 0
    result = run_cli("train", f"recipe={recipe}", *EQUIVALENCE, "launcher=ddp", "launcher.num_processes=2",
                     "launcher.main_process_port=0", "train.per_device_batch_size=4", f"run.output_dir={ddp}")
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"launching: accelerate launch --config_file {ddp.resolve()}/accelerate_config.yaml -m alignctl.cli" in result.stderr
    assert result.stderr.count("alignctl run summary") == 1  # only the main process reports
    assert (ddp / "final_model" / "model.safetensors").is_file()
    records = read_metrics(ddp)
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # one metrics.jsonl, one line per step
    expected = [r["loss"] for r in read_metrics(single)]
    # same seed, same global batches (8 = 4 per process x 2): the same losses up to float error
    assert [r["loss"] for r in records] == pytest.approx(expected, abs=2e-5), (
        "the DDP run's global batch k differs from the single-process batch k (data order), or the "
        "loss is not normalised over the global batch"
    )
    assert [r["grad_norm"] for r in records] == pytest.approx([r["grad_norm"] for r in read_metrics(single)], abs=1e-4)


def test_a_user_error_in_the_launched_processes_is_the_last_line(tmp_path):
    result = run_cli("train", "recipe=smoke/sft", "launcher=ddp", "launcher.main_process_port=0",
                     "dataset.path=/nonexistent/train.jsonl", f"run.output_dir={tmp_path}")
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: dataset.path=/nonexistent/train.jsonl"), result.stderr[-3000:]
    assert not (tmp_path / ".launch_errors").exists()
