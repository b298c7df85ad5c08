"""``alignctl validate`` (check a config without running it) and ``alignctl cp`` (copy a shipped
recipe or preset to edit it).

    alignctl validate [--from RUN_DIR] [--config-dir DIR] [OVERRIDE ...]
    alignctl cp recipe NAME DEST [--force]
    alignctl cp GROUP/PRESET DEST [--force]
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from alignctl.errors import ConfigError, ModelLoadError

VALIDATE_USAGE = """usage: alignctl validate [--from RUN_DIR] [--config-dir DIR] [OVERRIDE ...]

Composes the config exactly as `alignctl train` would and checks it without running or writing
anything: keys and types, value ranges, the algorithm's and the launcher's settings, that data and
model files exist, and that the model is a local folder or in the local Hugging Face cache (or the
hub can be reached). Prints "config OK" and a short summary, or one error line (exit code 2).
"""

CP_USAGE = """usage: alignctl cp recipe NAME DEST [--force]
       alignctl cp GROUP/PRESET DEST [--force]

Copies a shipped recipe (see `alignctl list`) or a preset of a config group (e.g. model/tiny) to
DEST for editing: a file, or a folder to copy into. An existing file is kept unless --force.
Run a copied recipe with `alignctl train recipe=DEST`; a copied preset goes to DIR/GROUP/NAME.yaml
and is used with `alignctl train --config-dir DIR GROUP=NAME`.
"""


# ----------------------------------------------------------------------------------------- validate
def validate_command(args: List[str]) -> int:
    from rich.console import Console

    from alignctl import launch, user_configs
    from alignctl.compose import compose_job
    from alignctl.inputs import check_inputs
    from alignctl.registry import get_algorithm
    from alignctl.run_dir import plan_run
    from alignctl.validate import validate_job

    if any(arg in ("-h", "--help") for arg in args):
        print(VALIDATE_USAGE)
        return 0
    overrides = []
    rest = iter(args)
    for arg in rest:
        overrides.append(user_configs.take_option(arg, rest) or user_configs.absolute_recipe(arg))
    job = compose_job(overrides)
    algorithm = get_algorithm(job.algo.name)
    validate_job(job)
    algorithm.check(job)
    launch.validate_launcher(job)
    check_inputs(job)
    lines = [("algo", _algo_line(job))]
    lines += [(key, text) for key, text in model_reachability(job)]
    lines.append(("dataset", _dataset_line(job)))
    lines.append(("setup", _setup_line(job)))
    lines.append(("training", _training_line(job)))
    plan = plan_run(job)  # reads the run directory (a finished run, checkpoints to resume), writes nothing
    if plan.candidates:
        lines.append(("run directory", f"{plan.run_dir} (resumes from {plan.candidates[0]})"))
    else:
        state = "exists, an earlier run is replaced" if plan.run_dir.exists() else "new"
        lines.append(("run directory", f"{plan.run_dir} ({state})"))
    notes = _launch_notes(job)
    out = Console(highlight=False, soft_wrap=True)  # stdout: the command's output
    out.print("[bold green]config OK[/]")
    width = max(len(key) for key, _ in lines)
    for key, text in lines:
        out.print(f"  {key.ljust(width)}  {_escape(text)}")
    for note in notes:
        out.print(f"[yellow]note:[/] {_escape(note)}")
    return 0


def model_reachability(job) -> List[Tuple[str, str]]:
    """(key, how it is reached) for every model the run loads; ModelLoadError for one it cannot."""
    from alignctl.models.diffusion import TINY_SD

    model = job.model
    found = []
    if model.arch is not None:
        found.append(("model", f"{model.name_or_path}: built-in random model (model.arch), nothing to download"))
    elif job.algo.name == "ddpo" and model.name_or_path == TINY_SD:
        found.append(("model", f"{TINY_SD}: built-in random diffusion pipeline, nothing to download"))
    else:
        found.append(("model", _reach("model.name_or_path", model.name_or_path, model.revision)))
    for key in ("model.tokenizer_name_or_path", "model.ref_name_or_path"):
        value = _select(job, key)
        if value:
            found.append((key.split(".", 1)[1], _reach(key, value, model.revision)))
    reward_model = _select(job, "reward.model")
    if reward_model:
        found.append(("reward model", _reach("reward.model", reward_model, None)))
    return found


def _reach(key: str, value: str, revision: Optional[str]) -> str:
    path = Path(value).expanduser()
    if path.exists():
        if path.is_dir() and not _is_model_folder(path):
            raise ModelLoadError(
                f"{key}={value}: the folder holds no model (no config.json, adapter_config.json, "
                "model_index.json, tokenizer files, a GGUF file or a run's final_model/); point it at a saved model"
            )
        return f"{value} (local)"
    from alignctl.models.load import _looks_like_path

    if _looks_like_path(value):
        raise ModelLoadError(f"{key}={value}: no such directory")
    if _in_hub_cache(value, revision):
        return f"{value} (hub id, in the local Hugging Face cache)"
    from alignctl.data.load import hub_offline_reason

    offline = hub_offline_reason()
    if offline:
        raise ModelLoadError(
            f"{key}={value}: hub id not in the local Hugging Face cache and the hub cannot be reached ({offline}); "
            f"download it once where the hub is reachable (`hf download {value}`, same HF_HOME), or set {key} to a "
            "local folder"
        )
    return f"{value} (hub id, not cached yet: downloaded when the run starts)"


def _is_model_folder(path: Path) -> bool:
    names = ("config.json", "adapter_config.json", "model_index.json", "tokenizer_config.json", "tokenizer.json")
    return (
        any((path / name).is_file() for name in names)
        or any(path.glob("*.gguf"))
        or (path / "final_model").is_dir()
    )


def _in_hub_cache(repo_id: str, revision: Optional[str]) -> bool:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id, revision=revision, local_files_only=True)
    except Exception:  # not cached, or not a valid repo id
        return False
    return True


def _select(job, key: str):
    from omegaconf import OmegaConf

    return OmegaConf.select(job, key, default=None)


def _algo_line(job) -> str:
    loss = _select(job, "algo.loss_type")
    return job.algo.name + (f" (loss_type {loss})" if loss else "")


def _dataset_line(job) -> str:
    data = job.dataset
    line = f"{data.path} (train split {data.train_split}"
    if data.eval_split:
        line += f", eval split {data.eval_split}"
    elif data.eval_fraction:
        line += f", eval {data.eval_fraction:g} of train held out"
    line += ")"
    from alignctl.data.load import split_path

    is_local = str(data.path).startswith("builtin:") or split_path(data, data.train_split) is not None
    if not is_local:
        from alignctl.data.load import hub_offline_reason

        offline = hub_offline_reason()
        line += ", a hub data set" + (f"; the hub cannot be reached ({offline}): the run needs a cached copy" if offline else "")
    return line


def _setup_line(job) -> str:
    launcher = job.launcher
    processes = launcher.num_processes * launcher.num_machines if launcher.name != "local" else 1
    return f"peft {job.peft.method}, precision {job.precision.name}, launcher {launcher.name} ({processes} process(es))"


def _training_line(job) -> str:
    train = job.train
    length = f"max_steps {train.max_steps}" if train.max_steps > 0 else f"num_epochs {train.num_epochs:g}"
    return (
        f"{length}, batch {train.per_device_batch_size} per device x {train.gradient_accumulation_steps} "
        f"accumulation, lr {train.lr:g}"
    )


def _launch_notes(job) -> List[str]:
    """What this machine lacks to start the launch (validate may run on another machine than the run)."""
    from alignctl import launch

    if job.launcher.name == "local":
        return []
    try:
        launch.check_can_launch(job)
    except ConfigError as exc:
        return [f"on this machine: {exc}"]
    return []


# ----------------------------------------------------------------------------------------- cp
def cp_command(args: List[str]) -> int:
    from alignctl.tracking import console

    if not args or any(arg in ("-h", "--help") for arg in args):
        print(CP_USAGE)
        return 0 if args else 2
    force = "--force" in args or "-f" in args
    words = [arg for arg in args if arg not in ("--force", "-f")]
    unknown = [w for w in words if w.startswith("-")]
    if unknown:
        raise ConfigError(f"cp: unknown option {unknown[0]}; use --force to overwrite an existing file")
    kind, source, name, dest_text = _cp_source(words)
    dest = _cp_destination(Path(dest_text).expanduser(), name.rpartition("/")[2], dest_text)
    if dest.exists() and not force:
        raise ConfigError(f"cp: {dest} exists; pass --force to overwrite it, or choose another DEST")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
    except OSError as exc:
        raise ConfigError(f"cp: cannot write {dest} ({exc.strerror or exc}); choose a DEST in a writable folder") from None
    console.print(f"copied {kind} {name} to {dest}", highlight=False, soft_wrap=True)
    for line in _cp_next_steps(kind, name, dest):
        console.print(_escape(line), highlight=False, soft_wrap=True)
    return 0


def _cp_source(words: List[str]) -> Tuple[str, Path, str, str]:
    """(kind, shipped file, name, DEST) from ``recipe NAME DEST`` or ``GROUP/PRESET DEST``."""
    from alignctl.compose import GROUPS, configs_dir, list_presets, list_recipes, recipes_dir

    if words and words[0] in ("recipe", "recipes"):
        if len(words) != 3:
            raise ConfigError("cp: use alignctl cp recipe NAME DEST (e.g. alignctl cp recipe smoke/dpo my_dpo.yaml)")
        name = _strip_yaml(words[1])
        if name not in list_recipes():
            raise ConfigError(f"cp: recipe {name}: no such recipe; choose one of: {', '.join(list_recipes())}")
        return "recipe", recipes_dir() / f"{name}.yaml", name, words[2]
    if len(words) != 2 or "/" not in words[0]:
        raise ConfigError(
            "cp: use alignctl cp recipe NAME DEST, or alignctl cp GROUP/PRESET DEST (e.g. model/tiny) for a preset"
        )
    group, _, preset = _strip_yaml(words[0]).partition("/")
    if group not in GROUPS:
        raise ConfigError(f"cp: {words[0]}: no config group '{group}'; groups: {', '.join(GROUPS)} (or: cp recipe NAME DEST)")
    if preset not in list_presets(group):
        raise ConfigError(f"cp: {group}/{preset}: no such preset; choose one of: {', '.join(list_presets(group))}")
    return "preset", configs_dir() / group / f"{preset}.yaml", f"{group}/{preset}", words[1]


def _cp_destination(dest: Path, leaf: str, given: str) -> Path:
    if dest.is_dir() or given.endswith(("/", "\\")):
        return dest / f"{leaf}.yaml"
    if dest.suffix in (".yaml", ".yml"):
        return dest
    if dest.suffix:
        raise ConfigError(f"cp: {given}: a config file must end in .yaml")
    return dest.with_name(dest.name + ".yaml")


def _cp_next_steps(kind: str, name: str, dest: Path) -> Iterator[str]:
    if kind == "recipe":
        yield f"edit it, then run it: alignctl train recipe={dest}"
        return
    group, _, preset = name.partition("/")
    if dest.parent.name == group:
        if dest.stem == preset:
            yield (f"rename it before use: a preset in a --config-dir may not reuse the shipped name {preset}")
        yield f"edit it, then use it: alignctl train --config-dir {dest.parent.parent} {group}={dest.stem}"
    else:
        yield f"to use it, put it at DIR/{group}/NAME.yaml and run: alignctl train --config-dir DIR {group}=NAME"


def _strip_yaml(name: str) -> str:
    for suffix in (".yaml", ".yml"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
