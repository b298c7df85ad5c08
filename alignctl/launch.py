"""Several processes or machines: the ``launcher`` group becomes an ``accelerate launch``.

``alignctl train launcher=ddp ...`` does not train in its own process. It

1. fixes the run directory once (so every process writes the same one) and writes the resolved
   config (``config.yaml``) and an accelerate config file (``accelerate_config.yaml``) into it;
2. prints and runs::

       accelerate launch --config_file RUN_DIR/accelerate_config.yaml -m alignctl.cli train \\
           OVERRIDES... run.output_dir=RUN_DIR

   forwarding its output, and exits with its return code.

Each launched process composes the same config (same overrides, same launcher settings) and
trains: it knows it is already inside a launch because the launcher (torchrun, under accelerate or
DeepSpeed) set ``LOCAL_RANK`` in its environment, so it does not launch again.

``alignctl launch-cmd OVERRIDES`` (or ``alignctl train OVERRIDES --dry-run``) writes the same
files and prints the command(s) without running them, one per machine when
``launcher.num_machines > 1``, for cluster schedulers.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig

from alignctl.errors import ConfigError

LAUNCHERS = ("local", "ddp", "fsdp", "deepspeed")
ACCELERATE_CONFIG = "accelerate_config.yaml"
DEEPSPEED_MISSING = 'launcher=deepspeed needs DeepSpeed: pip install -e ".[deepspeed]"'
FSDP_NEEDS_GPU = (
    "launcher=fsdp needs CUDA GPUs (none here): accelerate shards with FSDP only on GPU-type devices; "
    "use launcher=ddp on CPU, or print the command for a GPU machine with `alignctl launch-cmd launcher=fsdp ...`"
)
# The parent tells the launched processes (environment) where to append the one-line errors they
# stop on, so it can repeat them as its own last line.
ERRORS_ENV = "ALIGNCTL_LAUNCH_ERRORS"
LAUNCH_ERRORS = ".launch_errors"

FSDP_SHARDING = {
    "full_shard": "FULL_SHARD",
    "hybrid_shard": "HYBRID_SHARD",
    "shard_grad_op": "SHARD_GRAD_OP",
    "no_shard": "NO_SHARD",
}
FSDP_STATE_DICT = {"full_state_dict": "FULL_STATE_DICT", "sharded_state_dict": "SHARDED_STATE_DICT"}
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def inside_launch() -> bool:
    """True in a process started by a launcher (torchrun, accelerate, DeepSpeed): it trains itself."""
    return os.environ.get("LOCAL_RANK") is not None


@dataclass
class LaunchPlan:
    run_dir: Path
    config_file: Path
    accelerate_config: Dict[str, Any]
    # Child overrides: the user's, with run.output_dir pinned to run_dir.
    overrides: List[str]
    # One command per machine rank when there are several machines, else one.
    commands: List[List[str]]


# ---------------------------------------------------------------------------------------------
# validation and the accelerate config


def validate_launcher(job: DictConfig) -> None:
    """One clear ConfigError for launcher settings accelerate would reject (or misread)."""
    cfg = job.launcher
    if cfg.name not in LAUNCHERS:
        raise ConfigError(f"launcher.name={cfg.name!r}: use one of {', '.join(LAUNCHERS)}")
    if cfg.name == "local":
        return
    if cfg.num_processes < 1:
        raise ConfigError(f"launcher.num_processes={cfg.num_processes}: needs at least 1 process per machine")
    if cfg.num_machines < 1:
        raise ConfigError(f"launcher.num_machines={cfg.num_machines}: needs at least 1 machine")
    if not 0 <= cfg.machine_rank < cfg.num_machines:
        raise ConfigError(
            f"launcher.machine_rank={cfg.machine_rank}: must be between 0 and launcher.num_machines-1 "
            f"({cfg.num_machines - 1})"
        )
    if cfg.num_machines > 1 and not cfg.main_process_ip:
        raise ConfigError(
            f"launcher.num_machines={cfg.num_machines} needs launcher.main_process_ip: the address of the "
            "machine with machine_rank 0, reachable from every machine"
        )
    if not 0 <= cfg.main_process_port <= 65535:
        raise ConfigError(f"launcher.main_process_port={cfg.main_process_port}: not a port number")
    if cfg.main_process_port == 0 and cfg.num_machines > 1:
        raise ConfigError(
            "launcher.main_process_port=0 (pick a free port) only works on one machine; set a port every "
            "machine can reach, e.g. launcher.main_process_port=29500"
        )
    total = cfg.num_processes * cfg.num_machines
    if cfg.name == "ddp" and total < 2:
        raise ConfigError(
            f"launcher=ddp needs at least 2 processes in all (launcher.num_processes x launcher.num_machines "
            f"= {total}); use launcher=local for one process"
        )
    if job.precision.name not in MIXED_PRECISION:
        raise ConfigError(f"precision.name={job.precision.name!r}: use fp32, bf16 or fp16")
    if cfg.name == "fsdp":
        if cfg.fsdp.sharding_strategy not in FSDP_SHARDING:
            raise ConfigError(
                f"launcher.fsdp.sharding_strategy={cfg.fsdp.sharding_strategy!r}: use one of {', '.join(FSDP_SHARDING)}"
            )
        if cfg.fsdp.state_dict_type not in FSDP_STATE_DICT:
            raise ConfigError(
                f"launcher.fsdp.state_dict_type={cfg.fsdp.state_dict_type!r}: use one of {', '.join(FSDP_STATE_DICT)}"
            )
    if cfg.name == "deepspeed":
        if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"launcher.deepspeed.zero_stage={cfg.deepspeed.zero_stage}: use 0, 1, 2 or 3")
        if cfg.deepspeed.offload_params and cfg.deepspeed.zero_stage != 3:
            raise ConfigError(
                "launcher.deepspeed.offload_params=true needs launcher.deepspeed.zero_stage=3 (only stage 3 "
                "partitions parameters)"
            )


def accelerate_config(job: DictConfig) -> Dict[str, Any]:
    """accelerate's ``config_file`` (as a dict) for the launcher group of ``job``.

    ``num_processes`` is the total over all machines, as accelerate expects. ``machine_rank`` is
    written as 0: the file is the same on every machine and each machine's command passes its own
    ``--machine_rank``.
    """
    validate_launcher(job)
    cfg = job.launcher
    if cfg.name == "local":
        raise ConfigError("launcher=local runs in this process; pick launcher=ddp, fsdp or deepspeed to launch")
    config: Dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed": "DEEPSPEED"}[cfg.name],
        "mixed_precision": MIXED_PRECISION[job.precision.name],
        "num_machines": int(cfg.num_machines),
        "num_processes": int(cfg.num_processes * cfg.num_machines),
        "machine_rank": 0,
        "main_process_port": int(cfg.main_process_port),
        "gpu_ids": "all",
        "use_cpu": False,
        "downcast_bf16": False,
        "debug": False,
    }
    if cfg.num_machines > 1:
        config["main_process_ip"] = str(cfg.main_process_ip)
        # Static rendezvous at main_process_ip:main_process_port (torchrun's master address).
        config["rdzv_backend"] = "static"
        config["same_network"] = True
    if cfg.name == "fsdp":
        config["fsdp_config"] = {
            "fsdp_version": 1,
            "fsdp_sharding_strategy": FSDP_SHARDING[cfg.fsdp.sharding_strategy],
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": transformer_layer_classes(job),
            "fsdp_offload_params": bool(cfg.fsdp.cpu_offload),
            "fsdp_state_dict_type": FSDP_STATE_DICT[cfg.fsdp.state_dict_type],
            "fsdp_backward_prefetch": "BACKWARD_PRE",
            "fsdp_forward_prefetch": False,
            # LoRA (frozen and trainable parameters in one wrapped unit) needs the original parameters.
            "fsdp_use_orig_params": True,
            "fsdp_sync_module_states": True,
            # Every rank builds the full model itself (a DPO reference is a copy of the policy, which
            # must not be an empty meta-device model on ranks > 0).
            "fsdp_cpu_ram_efficient_loading": False,
            "fsdp_activation_checkpointing": False,
        }
    if cfg.name == "deepspeed":
        ds = cfg.deepspeed
        deepspeed: Dict[str, Any] = {
            "zero_stage": int(ds.zero_stage),
            "offload_optimizer_device": "cpu" if ds.offload_optimizer else "none",
            "offload_param_device": "cpu" if ds.offload_params else "none",
            "gradient_accumulation_steps": int(job.train.gradient_accumulation_steps),
            "zero3_init_flag": False,
            "zero3_save_16bit_model": int(ds.zero_stage) == 3,
        }
        if job.train.max_grad_norm > 0:
            deepspeed["gradient_clipping"] = float(job.train.max_grad_norm)
        if cfg.num_machines > 1:
            # torchrun on every machine (one command per machine), not pdsh over ssh.
            deepspeed["deepspeed_multinode_launcher"] = "standard"
        config["deepspeed_config"] = deepspeed
    return config


def transformer_layer_classes(job: DictConfig) -> str:
    """The layer class(es) FSDP wraps: launcher.fsdp.transformer_layer_cls_to_wrap, or the model
    class's ``_no_split_modules`` read from its config alone (no weights are loaded)."""
    given = job.launcher.fsdp.transformer_layer_cls_to_wrap
    if given:
        return str(given)
    model_cls = _model_class(job)
    names = list(getattr(model_cls, "_no_split_modules", None) or [])
    if not names:
        raise ConfigError(
            f"{model_cls.__name__} does not name its transformer layer class (_no_split_modules); set "
            "launcher.fsdp.transformer_layer_cls_to_wrap=<decoder layer class name>"
        )
    return ",".join(names)


def _model_class(job: DictConfig) -> type:
    model = job.model
    if model.arch is not None:  # the built-in tiny model is a LlamaForCausalLM
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from alignctl.models.load import _from_pretrained, _gguf_location

    kwargs: Dict[str, Any] = {"revision": model.revision, "trust_remote_code": model.trust_remote_code}
    source = model.name_or_path
    try:
        if model.gguf_file:
            source, kwargs["gguf_file"] = _gguf_location(model)
        config = _from_pretrained(AutoConfig, source, kwargs, what="model config")
    except Exception as exc:  # best effort (missing gguf package, bad config, ...): say how to skip it
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"cannot read the model config to find the layer class FSDP wraps ({detail}); set "
            "launcher.fsdp.transformer_layer_cls_to_wrap=<decoder layer class name>, e.g. LlamaDecoderLayer"
        ) from None
    auto_cls = AutoModelForSequenceClassification if job.algo.name == "reward" else AutoModelForCausalLM
    auto_map = getattr(config, "auto_map", None) or {}
    if model.trust_remote_code and auto_cls.__name__ in auto_map:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(auto_map[auto_cls.__name__], source, revision=model.revision)
    from transformers.models.auto.auto_factory import _get_model_class

    try:
        return _get_model_class(config, auto_cls._model_mapping)
    except (KeyError, ValueError):
        raise ConfigError(
            f"no {auto_cls.__name__} class for model type {config.model_type!r}; set "
            "launcher.fsdp.transformer_layer_cls_to_wrap=<decoder layer class name>"
        ) from None


# ---------------------------------------------------------------------------------------------
# the plan: run directory, files, commands


def plan_launch(job: DictConfig, overrides: Sequence[str]) -> LaunchPlan:
    """Fix the run directory and build the accelerate config and command(s); writes nothing."""
    from alignctl.run_dir import plan_run

    config = accelerate_config(job)
    # The folder checks (and, with resume, the checkpoint checks) every launched process repeats.
    run_dir = plan_run(job).run_dir.expanduser().resolve()
    config_file = run_dir / ACCELERATE_CONFIG
    child = [o for o in overrides if _override_key(o) != "run.output_dir"]
    child.append(f"run.output_dir={hydra_quote(str(run_dir))}")
    cfg = job.launcher
    ranks: List[Optional[int]] = list(range(cfg.num_machines)) if cfg.num_machines > 1 else [None]
    commands = []
    for rank in ranks:
        command = ["accelerate", "launch", "--config_file", str(config_file)]
        if rank is not None:
            command += ["--machine_rank", str(rank)]
        command += ["-m", "alignctl.cli", "train", *child]
        commands.append(command)
    return LaunchPlan(run_dir, config_file, config, child, commands)


def write_launch_files(plan: LaunchPlan, job: DictConfig, *, write_job_config: bool = True) -> None:
    """accelerate_config.yaml and config.yaml (the config every launched process composes)."""
    import yaml

    from alignctl.compose import compose_job
    from alignctl.run_dir import mark_run_dir, write_config

    plan.run_dir.mkdir(parents=True, exist_ok=True)
    mark_run_dir(plan.run_dir, job.algo.name)  # so the launched processes recognise it as a run directory
    header = (
        "# accelerate config written by alignctl from the launcher group of config.yaml\n"
        f"# launcher={job.launcher.name}; run with: accelerate launch --config_file {plan.config_file} ...\n"
    )
    text = header + yaml.safe_dump(plan.accelerate_config, sort_keys=False)
    tmp = plan.config_file.with_name(f".{plan.config_file.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, plan.config_file)  # several machines may write the same (identical) file
    if write_job_config:
        write_config(compose_job(plan.overrides), plan.run_dir)


def shell_command(command: Sequence[str]) -> str:
    return shlex.join(command)


def hydra_quote(value: str) -> str:
    """``value`` as a Hydra override value (quoted when it holds characters Hydra would parse)."""
    if re.fullmatch(r"[A-Za-z0-9_./:+@%~\-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _override_key(override: str) -> str:
    key, _, _ = override.partition("=")
    return key.lstrip("+~")


# ---------------------------------------------------------------------------------------------
# commands


def print_launch(job: DictConfig, overrides: Sequence[str]) -> int:
    """``alignctl launch-cmd``: write the files, print the command(s) on stdout, run nothing."""
    from alignctl.tracking import console

    plan = plan_launch(job, overrides)
    write_launch_files(plan, job)
    cfg = job.launcher
    console.print(f"wrote {plan.config_file} and {plan.run_dir / 'config.yaml'}", highlight=False, soft_wrap=True)
    if cfg.name == "deepspeed" and not deepspeed_available():
        console.print(f"[yellow]note:[/] DeepSpeed is not installed here; {_escape(DEEPSPEED_MISSING)}", highlight=False, soft_wrap=True)
    if cfg.num_machines > 1:
        console.print(
            f"{cfg.num_machines} machines x {cfg.num_processes} processes: run line N+1 below on the machine with "
            f"machine_rank N (machine 0 is {cfg.main_process_ip}:{cfg.main_process_port}); every machine needs "
            f"the run directory {plan.run_dir} (a shared file system) and this alignctl checkout",
            highlight=False,
            soft_wrap=True,
        )
    for command in plan.commands:
        print(shell_command(command), flush=True)
    return 0


def launch(job: DictConfig, overrides: Sequence[str]) -> int:
    """``alignctl train launcher=ddp|fsdp|deepspeed``: write the files, run accelerate launch, return its code."""
    from alignctl.errors import AlignctlError
    from alignctl.tracking import console

    cfg = job.launcher
    validate_launcher(job)
    check_can_launch(job)
    if cfg.num_machines > 1 and not job.run.output_dir:
        raise ConfigError(
            f"launcher.num_machines={cfg.num_machines}: set run.output_dir to a directory every machine shares "
            "(each machine would pick its own default name), or print the commands for all machines with "
            "`alignctl launch-cmd ...`"
        )
    plan = plan_launch(job, overrides)
    # With several machines each runs this command; only machine 0 writes config.yaml.
    write_launch_files(plan, job, write_job_config=cfg.machine_rank == 0)
    command = plan.commands[cfg.machine_rank if cfg.num_machines > 1 else 0]
    executable = _accelerate_executable()
    errors_file = plan.run_dir / LAUNCH_ERRORS
    errors_file.unlink(missing_ok=True)
    env = dict(os.environ, **{ERRORS_ENV: str(errors_file)})
    console.print(f"[bold]launching:[/] {_escape(shell_command(command))}", highlight=False, soft_wrap=True)
    try:
        process = subprocess.Popen([*executable, *command[1:]], env=env)
    except OSError as exc:
        raise AlignctlError(f"cannot start accelerate launch: {exc}") from None
    interrupted = False
    try:
        code = process.wait()
    except KeyboardInterrupt:
        # Ctrl+C reached the whole process group: the launcher passes SIGINT on to its workers,
        # which finish the current step, write a checkpoint and stop. Wait for them; a second
        # Ctrl+C kills the launcher at once.
        interrupted = True
        try:
            code = process.wait()
        except KeyboardInterrupt:
            process.kill()
            code = process.wait()
    reported = _read_reported_errors(errors_file)
    if reported and (code != 0 or interrupted):
        # A launched process stopped on a user error or a signal (printed above, before the
        # launcher's report): repeat it as the last line and exit with its code (2, 130, ...).
        for message in dict.fromkeys(message for _, message in reported):
            console.print(f"[bold red]error:[/] {_escape(message)}", highlight=False, soft_wrap=True)
        return reported[0][0]
    if interrupted:
        console.print("[yellow]interrupted[/]")
        return 130
    if code != 0:
        console.print(
            f"[bold red]error:[/] the launched run failed (accelerate launch exited with {code}); see its output above",
            highlight=False,
            soft_wrap=True,
        )
    return code


def report_error(message: str, exit_code: int = 2) -> None:
    """In a launched process: hand a user error to the parent, which repeats it as its last line."""
    path = os.environ.get(ERRORS_ENV)
    if not path or not inside_launch():
        return
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(f"{int(exit_code)}\t{os.environ.get('RANK', '0')}\t{' '.join(message.split())}\n")
    except OSError:
        pass


def _read_reported_errors(path: Path) -> List[Tuple[int, str]]:
    """(exit code, message) the launched processes reported: the main process's (global rank 0)
    when it reported any, else every process's, in order."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    path.unlink(missing_ok=True)
    reported = []
    for line in lines:
        parts = line.split("\t", 2)
        if len(parts) == 3 and parts[0].isdigit() and parts[2].strip():
            reported.append((parts[1], int(parts[0]), parts[2]))
    main = [r for r in reported if r[0] == "0"]
    return [(code, message) for _, code, message in (main or reported)]


def check_can_launch(job: DictConfig) -> None:
    """What this machine must have to start the launch (checked before anything starts)."""
    name = job.launcher.name
    if name == "deepspeed" and not deepspeed_available():
        raise ConfigError(DEEPSPEED_MISSING)
    if name == "fsdp" and not _cuda_available():
        raise ConfigError(FSDP_NEEDS_GPU)
    if job.precision.name == "fp16" and not _cuda_available():
        raise ConfigError("precision=fp16 needs a CUDA GPU (none here); use precision=bf16 or fp32 on CPU")


def prepare_launched_process(job: DictConfig) -> None:
    """In a launched process, before the Accelerator exists: on a machine without a GPU, make
    accelerate join the processes over gloo (DistributedType.MULTI_CPU). Without this flag
    accelerate sees no GPU and no ``cpu=True`` and runs every process as an unconnected
    single-process run."""
    validate_launcher(job)
    name = job.launcher.name
    if name == "fsdp" and not _cuda_available():
        raise ConfigError(FSDP_NEEDS_GPU)
    if name in ("local", "ddp") and not _cuda_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _accelerate_executable() -> List[str]:
    """``accelerate`` of this Python environment (the workers must run the same interpreter)."""
    beside = Path(sys.executable).parent / "accelerate"
    if beside.is_file():
        return [str(beside)]
    return [sys.executable, "-m", "accelerate.commands.accelerate_cli"]


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
