"""The ``alignctl`` command.

    alignctl train [OVERRIDE ...] [--cfg job]   compose the config from Hydra overrides and run it
    alignctl launch-cmd [OVERRIDE ...]           print the accelerate launch command(s), run nothing
    alignctl validate [OVERRIDE ...]             check a config (keys, ranges, files, model) without running
    alignctl cp recipe NAME DEST                 copy a shipped recipe (or GROUP/PRESET) to edit it
    alignctl list [GROUP=PRESET | SECTION ...]   algorithms, presets, recipes; or each knob's type, value, meaning
    alignctl explain KEY [OVERRIDE ...]          one knob (e.g. algo.beta) with its meaning
    alignctl data preview [OVERRIDE ...] [n=3]   the first rows as the model sees them, loss tokens marked
    alignctl version (or --version)              the installed version
    alignctl generate MODEL_OR_RUN_DIR PROMPT    sample an answer (generation.* settings); chat: a conversation
    alignctl eval MODEL_OR_RUN_DIR [dataset=..]  preference accuracy / perplexity without training; JSON out
    alignctl merge RUN_DIR [--out DIR]           fold a LoRA adapter into its base: a plain transformers model
    alignctl plot RUN_DIR [RUN_DIR ...] [--out DIR]  PNGs of loss, lr and the algorithm's metrics, runs overlaid

Each sub-command is one entry of ``COMMANDS``: a function taking the remaining argv and returning
the exit code, imported only when its command runs (so ``alignctl list`` never imports torch).
Problems with the user's input end in one red line naming the fix (exit code 2), not a traceback.
"""

from __future__ import annotations

import sys
from typing import List, Optional

USAGE = """usage: alignctl train [--from RUN_DIR] [--config-dir DIR] [OVERRIDE ...] [--cfg job] [--dry-run]
       alignctl launch-cmd [OVERRIDE ...]
       alignctl validate [--from RUN_DIR] [--config-dir DIR] [OVERRIDE ...]
       alignctl cp recipe NAME DEST [--force]   (or: alignctl cp GROUP/PRESET DEST)
       alignctl list [algo=dpo | train | ...]
       alignctl explain KEY [OVERRIDE ...]
       alignctl data preview [OVERRIDE ...] [n=3] [split=train|eval] [--plain]
       alignctl version
       alignctl generate MODEL_OR_RUN_DIR PROMPT [PROMPT ...] [generation.KEY=VALUE ...] [--raw] [--seed N]
       alignctl chat MODEL_OR_RUN_DIR [generation.KEY=VALUE ...] [--seed N]
       alignctl eval MODEL_OR_RUN_DIR [dataset=PRESET] [OVERRIDE ...] [--out FILE.json]
       alignctl merge RUN_DIR [--out DIR]
       alignctl plot RUN_DIR [RUN_DIR ...] [--out DIR]

OVERRIDE is a Hydra override: pick a preset of a group (algo=dpo model=tiny dataset=smoke_pref
peft=lora precision=bf16 launcher=local), a whole recipe (recipe=smoke/sft), or set a field
(train.lr=1e-4 algo.beta=0.05 run.output_dir=runs/mine). A recipe may be your own file
(recipe=./exp.yaml); --config-dir DIR adds your presets (DIR/model/mine.yaml -> model=mine) and
recipes (DIR/exp.yaml -> recipe=exp); --from RUN_DIR repeats a run from its config.yaml, with the
overrides, into a new run directory.
--cfg job prints the composed config and runs nothing. `alignctl list algo=dpo` shows every knob of
a group with its type, value and meaning; `alignctl explain train.lr` one knob.
`alignctl data preview algo=dpo dataset=...` renders the first rows as the model will see them.
launcher=ddp|fsdp|deepspeed runs the training under `accelerate launch` (launcher.num_processes,
launcher.num_machines, launcher.machine_rank, launcher.main_process_ip); `launch-cmd` (or
`train ... --dry-run`) writes the accelerate config into the run directory and prints the
command, one per machine, for cluster schedulers.
generate/chat/eval/merge take a trained model: a run directory (its final_model/, else its newest
checkpoint), a saved model folder, a .gguf file or a hub id; `alignctl eval --help` and the others
say more.
"""


def main(argv: Optional[List[str]] = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`alignctl list | head`): stop quietly instead of a traceback.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if args[0] in ("--version", "-V"):
        args[0] = "version"
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
    "validate": "alignctl.commands_config:validate_command",
    "cp": "alignctl.commands_config:cp_command",
    "list": "alignctl.options:list_command",
    "explain": "alignctl.options:explain_command",
    "version": "alignctl.options:version_command",
    "data": "alignctl.data.preview:data_command",
    "generate": "alignctl.tools.generate:generate_command",
    "chat": "alignctl.tools.generate:chat_command",
    "eval": "alignctl.tools.evaluate:eval_command",
    "merge": "alignctl.tools.merge:merge_command",
    "plot": "alignctl.plots:plot_command",
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
    from alignctl import launch, user_configs
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
        else:  # --from/--config-dir and recipe paths made absolute: a launch re-executes them elsewhere
            overrides.append(user_configs.take_option(arg, it) or user_configs.absolute_recipe(arg))
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
    note = user_configs.repeat_note(overrides)
    if note and not launch.inside_launch():
        from alignctl.tracking import console

        console.print(_escape(note), highlight=False, soft_wrap=True)
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


if __name__ == "__main__":
    sys.exit(main())
