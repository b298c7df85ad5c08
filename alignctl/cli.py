"""The ``alignctl`` command.

    alignctl train [OVERRIDE ...] [--cfg job]   compose the config from Hydra overrides and run it
    alignctl launch-cmd [OVERRIDE ...]           print the accelerate launch command(s), run nothing
    alignctl list                                algorithms, presets of every group, recipes

Each sub-command is one entry of ``COMMANDS``: a function taking the remaining argv and returning
the exit code, imported only when its command runs (so ``alignctl list`` never imports torch).
Problems with the user's input end in one red line naming the fix (exit code 2), not a traceback.
"""

from __future__ import annotations

import sys
from typing import List, Optional

USAGE = """usage: alignctl train [OVERRIDE ...] [--cfg job] [--dry-run]
       alignctl launch-cmd [OVERRIDE ...]
       alignctl list

OVERRIDE is a Hydra override: pick a preset of a group (algo=dpo model=tiny dataset=smoke_pref
peft=lora precision=bf16 launcher=local), a whole recipe (recipe=smoke/sft), or set a field
(train.lr=1e-4 algo.beta=0.05 run.output_dir=runs/mine).
--cfg job prints the composed config and runs nothing.
launcher=ddp|fsdp|deepspeed runs the training under `accelerate launch` (launcher.num_processes,
launcher.num_machines, launcher.machine_rank, launcher.main_process_ip); `launch-cmd` (or
`train ... --dry-run`) writes the accelerate config into the run directory and prints the
command, one per machine, for cluster schedulers.
"""


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = args[0], args[1:]
    _quiet_libraries()
    from alignctl.errors import AlignctlError
    from alignctl.tracking import console

    try:
        if command not in COMMANDS:
            import difflib

            close = difflib.get_close_matches(command, list(COMMANDS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            console.print(f"[red]error:[/] unknown command {command!r}{hint}; use one of: {', '.join(COMMANDS)}")
            return 2
        return _load_command(COMMANDS[command])(rest)
    except AlignctlError as exc:
        console.print(f"[bold red]error:[/] {_escape(str(exc))}", highlight=False, soft_wrap=True)
        from alignctl.launch import report_error

        code = getattr(exc, "exit_code", 2)
        report_error(str(exc), code)  # in a process started by `accelerate launch`: tell the parent
        return code
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130


# command name -> "module:function"; the function takes the argv after the command name.
COMMANDS = {
    "train": "alignctl.cli:_train",
    "launch-cmd": "alignctl.cli:_launch_cmd",
    "list": "alignctl.cli:_list",
}


def _load_command(target: str):
    import importlib

    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _launch_cmd(args: List[str]) -> int:
    return _train(args, dry_run=True)


def _quiet_libraries() -> None:
    """alignctl draws its own progress; silence the per-file bars of datasets and transformers."""
    import os

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _train(args: List[str], dry_run: bool = False) -> int:
    from alignctl import launch
    from alignctl.compose import compose_job
    from alignctl.registry import get_algorithm
    from alignctl.run_dir import config_text
    from alignctl.validate import validate_job

    print_cfg = None
    overrides = []
    it = iter(args)
    for arg in it:
        if arg in ("-h", "--help"):
            print(USAGE)
            return 0
        if arg in ("--cfg", "-c"):
            print_cfg = next(it, "job")
        elif arg.startswith("--cfg="):
            print_cfg = arg.split("=", 1)[1]
        elif arg == "--dry-run":
            dry_run = True
        else:
            overrides.append(arg)
    if print_cfg not in (None, "job", "all"):
        from alignctl.errors import ConfigError

        raise ConfigError(f"--cfg {print_cfg}: use --cfg job")
    job = compose_job(overrides)
    algorithm = get_algorithm(job.algo.name)
    validate_job(job)  # ranges, choices, interpolations: before anything is printed, written or launched
    if print_cfg:
        print(config_text(job), end="")  # as config.yaml will hold it (environment values unresolved)
        return 0
    algorithm.check(job)
    launch.validate_launcher(job)
    if dry_run:
        return launch.print_launch(job, overrides)
    from alignctl.inputs import check_inputs

    check_inputs(job)  # model, LoRA and data inputs: one clear line before anything loads or is written
    if launch.inside_launch():
        # One of the processes `accelerate launch` started: train here, never launch again.
        launch.prepare_launched_process(job)
    elif job.launcher.name != "local":
        return launch.launch(job, overrides)
    try:
        algorithm.load_driver()(job)
    finally:
        _close_process_group()
    return 0


def _close_process_group() -> None:
    """Leave the process group of a multi-process launch explicitly: a group torn down only at
    interpreter exit can abort a rank ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _list(args: List[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    from alignctl.compose import GROUPS, list_presets, list_recipes
    from alignctl.registry import ALGORITHMS

    console = Console()  # stdout: this listing is the command's output

    algos = Table(title="algorithms (algo.name)", title_justify="left")
    algos.add_column("name", style="bold")
    algos.add_column("what it trains")
    for algorithm in ALGORITHMS.values():
        algos.add_row(algorithm.name, algorithm.description)
    console.print(algos)
    presets = Table(title="presets (GROUP=PRESET)", title_justify="left")
    presets.add_column("group", style="bold")
    presets.add_column("presets")
    for group in GROUPS:
        presets.add_row(group, ", ".join(list_presets(group)))
    presets.add_row("recipe", ", ".join(list_recipes()))
    console.print(presets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
