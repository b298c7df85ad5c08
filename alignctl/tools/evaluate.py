"""``alignctl eval MODEL_OR_RUN_DIR [dataset=PRESET] [OVERRIDE ...]``: metrics without training.

- a policy on a pairwise set: preference accuracy and mean margin of the implicit reward
  beta * (logp - ref_logp) (DPO's), with the run's own reference (the starting model, the LoRA base,
  or ``model.ref_name_or_path``); without a reference (a model that is not a run's, and no
  ``model.ref_name_or_path``) the summed log-prob decides and the margin is in log-prob. A CPO,
  ORPO or SimPO run keeps its own rewards;
- a policy on an SFT set: the loss (mean NLL per token) and perplexity;
- a reward model (``algo=reward`` runs, sequence classifiers) on a pairwise set: pairwise accuracy.

The numbers are the training loop's own: the job is the run's ``config.yaml`` (with the overrides
on top), the algorithm builds its policy and reference exactly as for training, the trained
weights are loaded into that policy, and the batches go through the algorithm's ``compute_loss``
and the loop's own averaging (``engine.offline.evaluate_batches``, which the training loop's evaluation calls).
Rows evaluated: the data set's eval split (or its held-out ``eval_fraction``), else every row.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from alignctl.errors import ConfigError, ModelLoadError
from alignctl.tools.args import override_key, parse_args
from alignctl.tools.resolve import ARG, SavedModel, load_model, resolve_args

USAGE = """usage: alignctl eval MODEL_OR_RUN_DIR [dataset=PRESET] [OVERRIDE ...] [--out FILE.json]

MODEL_OR_RUN_DIR: a run directory (its final_model/, else its newest checkpoint), a saved model folder,
a .gguf file or a hub id. A run directory is evaluated with its own config (data set, lengths, batch
size, precision, reference); overrides change it: dataset=PRESET dataset.path=test.jsonl algo.beta=0.1
train.per_device_eval_batch_size=16 model.ref_name_or_path=BASE.
Pairwise data: preference accuracy and mean margin (pairwise accuracy for a reward model);
SFT data: loss and perplexity. Rows: the eval split (or dataset.eval_fraction), else every row.
Prints a table and writes JSON (default RUN_DIR/eval/<dataset>.json, ./eval/<dataset>.json otherwise).
"""

SECTIONS = ("dataset", "train", "model", "peft", "precision")  # taken from the run (algo: when the same)


def eval_command(args: List[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    parsed = parse_args(args, "eval", options=("--out",))
    if len(parsed.positional) != 1:
        raise ConfigError(
            f"eval takes one MODEL_OR_RUN_DIR and overrides (got {len(parsed.positional)} positional arguments: "
            f"{' '.join(parsed.positional) or 'none'}); see alignctl eval --help"
        )
    saved, overrides = resolve_args(parsed.positional[0], parsed.overrides)
    job, family = eval_job(saved, overrides)
    result = evaluate(saved, job, family)
    out = Path(parsed.flags["--out"]) if "--out" in parsed.flags else default_out(saved, job)
    write_result(out, result)
    show(result, out)
    return 0


# ------------------------------------------------------------------------------------ the job
def eval_job(saved: SavedModel, overrides: List[str]) -> Tuple[DictConfig, str]:
    """(job, family): the run's config (or the presets) with the overrides on top; family is the
    algorithm whose metrics are computed (dpo, cpo, orpo, reward or sft)."""
    from alignctl.compose import GROUPS

    for item in overrides:
        key = override_key(item)
        if key.split(".")[0] in ("run", "launcher", "resume", "generation", "reward"):
            raise ConfigError(f"{item}: eval does not use {key.split('.')[0]} settings; leave it out")
    chosen = {override_key(o): o.partition("=")[2] for o in overrides if override_key(o) in GROUPS}
    run = saved.run_config
    if run is None and "dataset" not in chosen and not any(override_key(o).startswith("dataset.") for o in overrides):
        raise ConfigError(f"eval {saved.source}: name the data to evaluate on with dataset=PRESET (and dataset.path=...)")
    others = [o for o in overrides if override_key(o) != "algo" and not override_key(o).startswith("algo.")]
    probe = _compose(others + ["algo=sft"], run, chosen, saved)
    family = _family(saved, probe, chosen.get("algo"), run)
    algo_choice = [] if "algo" in chosen else [f"algo={family}"]
    job = _compose(overrides + algo_choice, run, chosen, saved)
    if run is None and job.algo.name == "dpo" and not job.model.ref_name_or_path:
        job.algo.reference_free = True  # nothing to compare with: the summed log-prob decides
    from alignctl.validate import validate_job

    validate_job(job)
    return job, family


def _compose(overrides: List[str], run: Optional[DictConfig], chosen: Dict[str, str], saved: SavedModel) -> DictConfig:
    """Hydra composition of the overrides; then the run's sections (unless a preset of that group
    was chosen), then the overrides' fields again so they win over the run's values."""
    from alignctl.compose import GROUPS, compose_job
    from alignctl.registry import get_algorithm

    composed = compose_job(overrides)
    job = composed.copy()
    if run is not None:
        schemas = _section_schemas()
        for section in SECTIONS:
            if section not in chosen and section in run:
                job[section] = _typed(schemas[section], run[section], section, saved)
        if "algo" not in chosen and run.algo.name == composed.algo.name:
            job.algo = _typed(get_algorithm(run.algo.name).config_cls, run.algo, "algo", saved)
    else:  # the model to evaluate is the starting point itself
        job.model.arch = None
        job.model.name_or_path = saved.source if saved.kind == "hub" else str(saved.folder)
        job.model.gguf_file = saved.gguf_file
        job.model.tokenizer_name_or_path = None
        job.peft.method = "none"
    for item in overrides:
        key = override_key(item)
        if key not in GROUPS and not item.startswith("~"):
            OmegaConf.update(job, key, OmegaConf.select(composed, key), merge=False, force_add=True)
    return job


def _section_schemas() -> Dict[str, type]:
    from alignctl import config

    return {"dataset": config.DatasetConfig, "train": config.TrainConfig, "model": config.ModelConfig,
            "peft": config.PeftConfig, "precision": config.PrecisionConfig}


def _typed(schema: type, values: DictConfig, section: str, saved: SavedModel) -> DictConfig:
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), values)
    except Exception as exc:
        raise ConfigError(
            f"{saved.source}: the run's config.yaml has a {section} section this version cannot read "
            f"({str(exc).splitlines()[0]}); choose that group on the command line ({section}=PRESET)"
        ) from None


def _family(saved: SavedModel, probe: DictConfig, algo: Optional[str], run: Optional[DictConfig]) -> str:
    """Which algorithm's metrics fit the model and the data."""
    from alignctl.data.load import load_rows, peek_split_columns

    dataset = probe.dataset
    peeked = peek_split_columns(dataset, dataset.eval_split or dataset.train_split)
    if peeked is not None:
        columns = set(peeked)
    else:  # a hub data set: read it (the hub cache keeps it for the evaluation itself)
        raw = load_rows(dataset, seed=probe.train.seed)
        columns = set((raw.eval or raw.train)[0].data)
    pairwise = {"chosen", "rejected"} <= columns
    run_algo = run.algo.name if run is not None else None
    if saved.is_reward_model or run_algo == "reward":
        if not pairwise:
            raise ConfigError(
                f"{saved.source} is a reward model: evaluate it on a pairwise set (prompt/chosen/rejected), "
                f"not {probe.dataset.name} (columns: {', '.join(sorted(columns))})"
            )
        if algo not in (None, "reward"):
            raise ConfigError(f"algo={algo}: {saved.source} is a reward model; leave algo out (or algo=reward)")
        return "reward"
    if "label" in columns and not pairwise:
        raise ConfigError(
            f"dataset {probe.dataset.name} is an unpaired (KTO) set; eval takes a pairwise set (preference accuracy) "
            "or an SFT set (perplexity)"
        )
    if not pairwise:
        if algo not in (None, "sft"):
            raise ConfigError(f"algo={algo}: {probe.dataset.name} is an SFT set, evaluated with algo=sft (perplexity)")
        return "sft"
    from alignctl.registry import algorithms_where

    pairwise_policies = algorithms_where(loop="offline", data="pairs", trains="policy")  # their own metrics
    chosen_algo = algo or (run_algo if run_algo in pairwise_policies else "dpo")
    if chosen_algo == "simpo":
        chosen_algo = "cpo"
    if chosen_algo not in pairwise_policies:
        raise ConfigError(
            f"algo={chosen_algo}: a pairwise set is evaluated with algo=dpo (implicit reward), cpo, orpo or simpo"
        )
    return chosen_algo


# ------------------------------------------------------------------------------------ evaluation
def evaluate(saved: SavedModel, job: DictConfig, family: str) -> Dict[str, Any]:
    """Build the model as the run did, load the trained weights, and average the algorithm's
    metrics over the eval batches as the training loop does."""
    from accelerate import Accelerator

    from alignctl.engine.offline import evaluate_batches
    from alignctl.engine.optim import check_precision
    from alignctl.engine.run import fresh_accelerator_state
    from alignctl.models.load import load_tokenizer

    from alignctl.registry import get_algorithm

    algorithm = get_algorithm(family).build_offline(job.algo)
    tokenizer = load_tokenizer(job.model)
    data, split = _eval_data(algorithm, job, tokenizer)
    fresh_accelerator_state()  # another precision than an earlier run in this process (tests, notebooks)
    accelerator = Accelerator(mixed_precision=check_precision(job.precision.name))
    model = algorithm.build_model(job, tokenizer)
    # set-up first: a precomputed reference is the run's starting model, not the trained one
    algorithm.setup(job, accelerator, model, data)
    if saved.run_config is not None:
        load_trained_weights(algorithm.unwrap_for_save(model), saved, tokenizer)
    batch_size = job.train.per_device_eval_batch_size or job.train.per_device_batch_size
    loader = torch.utils.data.DataLoader(data.eval, batch_size=batch_size, collate_fn=data.collate)
    model, loader = accelerator.prepare(model, loader)
    record = evaluate_batches(algorithm, model, loader, accelerator)
    return {
        "model": saved.describe(),
        "run_dir": str(saved.run_dir) if saved.run_dir else None,
        "kind": "reward model" if family == "reward" else "policy",
        "algorithm": family if family != "cpo" else f"cpo ({job.algo.loss_type})",
        "dataset": job.dataset.name,
        "rows": f"{len(data.eval)} from {split}",
        "reference": _reference_note(algorithm, job),
        "summary": headline(family, job, record),
        "metrics": record,
        "notes": {key: value for key, value in data.notes},
    }


def _eval_data(algorithm, job: DictConfig, tokenizer):
    """(PreparedData holding only the rows to evaluate, where they came from), built by the
    algorithm's own prepare_data. With an eval split, only that split is read and tokenized."""
    from alignctl.engine.offline import PreparedData

    dataset = job.dataset
    if dataset.eval_split:
        only_eval = OmegaConf.merge(dataset, {"train_split": dataset.eval_split, "eval_split": None,
                                              "eval_fraction": 0.0, "max_rows": dataset.get("max_eval_rows")})
        prepared = algorithm.prepare_data(_with(job, dataset=only_eval), tokenizer)
        rows, split = prepared.train, f"split {dataset.eval_split}"
    else:
        prepared = algorithm.prepare_data(job, tokenizer)
        if prepared.eval:
            rows, split = prepared.eval, f"the held-out eval_fraction={dataset.eval_fraction} of {dataset.train_split}"
        else:
            rows, split = prepared.train, f"split {dataset.train_split}"
    return PreparedData(train=[], eval=rows, collate=prepared.collate, notes=prepared.notes), split


def _with(job: DictConfig, **sections) -> DictConfig:
    changed = job.copy()
    for key, value in sections.items():
        changed[key] = value
    return changed


def load_trained_weights(policy: torch.nn.Module, saved: SavedModel, tokenizer) -> None:
    """Put the saved weights into the policy the algorithm built from the run's config."""
    from alignctl.models.saved import is_adapter

    if saved.kind == "adapter":
        if not is_adapter(policy):
            raise ModelLoadError(f"{ARG}={saved.source}: a LoRA adapter, but the run's config says peft.method=none")
        _load_adapter_weights(policy, saved)
        return
    if is_adapter(policy):
        raise ModelLoadError(f"{ARG}={saved.source}: full weights, but the run's config trains a LoRA adapter")
    if _copy_saved_weights(policy, saved):
        return
    # a GGUF file, a hub model, or a checkpoint layout transformers converts on load (e.g. MoE
    # experts saved one by one): let transformers read it
    trained = load_model(saved, tokenizer).state_dict()
    missing, unexpected = _key_mismatch(policy, trained)
    if missing or unexpected:
        raise ModelLoadError(
            f"{ARG}={saved.source}: the saved weights do not fit the run's model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); the run's config.yaml describes another model"
        )
    try:
        policy.load_state_dict(trained, strict=False)  # strict would count tied parameters saved once
    except RuntimeError as exc:  # same names, other shapes
        raise ModelLoadError(
            f"{ARG}={saved.source}: the saved weights do not fit the run's model ({str(exc).splitlines()[-1].strip()}); "
            "the run's config.yaml describes another model"
        ) from None


def _copy_saved_weights(policy: torch.nn.Module, saved: SavedModel) -> bool:
    """Copy a saved full model's safetensors tensors into the policy one at a time (no second
    model, no second copy of the weights); False when the folder has no safetensors files or
    their names are not the policy's."""
    from safetensors import safe_open

    files = sorted(saved.folder.glob("*.safetensors")) if saved.kind == "full" else []
    if not files:
        return False
    where: Dict[str, Any] = {}
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt")
        except Exception as exc:  # a truncated or foreign file: say which
            raise ModelLoadError(f"{ARG}={saved.source}: {file} cannot be read ({str(exc).splitlines()[0]})") from None
        where.update(dict.fromkeys(handle.keys(), handle))
    if _key_mismatch(policy, where) != ([], []):
        return False
    targets = policy.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, handle in where.items():
            tensor = handle.get_tensor(key)
            if tensor.shape != targets[key].shape:
                raise ModelLoadError(
                    f"{ARG}={saved.source}: the saved {key} has shape {tuple(tensor.shape)}, the run's model "
                    f"{tuple(targets[key].shape)}; the run's config.yaml describes another model"
                )
            targets[key].copy_(tensor)
    return True


def _key_mismatch(policy: torch.nn.Module, weights: Dict[str, Any]) -> Tuple[List[str], List[str]]:
    """(missing, unexpected) keys of ``weights`` (names -> tensors, or where they are) for the
    policy; a parameter tied to a present one (lm_head to the embeddings, saved once) is not missing."""
    expected = policy.state_dict(keep_vars=True)
    present = {id(expected[key]) for key in weights if key in expected}
    missing = [key for key, value in expected.items() if key not in weights and id(value) not in present]
    return missing, [key for key in weights if key not in expected]


def _load_adapter_weights(policy, saved: SavedModel) -> None:
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    files = sorted(saved.folder.glob("adapter_model*.safetensors"))
    if not files:
        raise ModelLoadError(f"{ARG}={saved.source}: no adapter_model.safetensors in {saved.folder}")
    weights: Dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(load_file(str(file)))
    result = set_peft_model_state_dict(policy, weights)
    if result.unexpected_keys:
        raise ModelLoadError(
            f"{ARG}={saved.source}: the adapter does not fit the run's LoRA settings (unexpected "
            f"{result.unexpected_keys[:3]}); the run's config.yaml describes another adapter"
        )


def _reference_note(algorithm, job: DictConfig) -> Optional[str]:
    from alignctl.algos.preference import REFERENCE_NOTES

    reference = getattr(algorithm, "reference", None)
    if reference is None:
        return None
    if reference.mode == "none" and job.algo.get("reference_free"):
        return "none: summed log-probs decide (set model.ref_name_or_path to compare with a reference)"
    return REFERENCE_NOTES.get(reference.mode, reference.mode)


def headline(family: str, job: DictConfig, record: Dict[str, float]) -> Dict[str, float]:
    """The figures the table leads with."""
    if family == "sft":
        return {"loss": record["loss"], "perplexity": math.exp(record["loss"])}
    if family == "reward":
        return {"pairwise accuracy": record["accuracy"], "mean margin": record["rewards/margins"]}
    summary = {"preference accuracy": record["rewards/accuracies"]}
    if family == "dpo" and job.algo.reference_free:
        summary["mean log-prob margin"] = record["logps/chosen"] - record["logps/rejected"]
    else:
        summary["mean margin"] = record["rewards/margins"]
    summary["loss"] = record["loss"]
    return summary


# ------------------------------------------------------------------------------------ output
def default_out(saved: SavedModel, job: DictConfig) -> Path:
    folder = saved.run_dir / "eval" if saved.run_dir is not None else Path("eval")
    return folder / f"{_safe_name(job.dataset.name)}.json"


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)) or "dataset"


def write_result(path: Path, result: Dict[str, Any]) -> None:
    if path.is_dir():
        raise ConfigError(f"--out {path} is a directory; give a file name such as {path / 'eval.json'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--out {path}: cannot write ({exc.strerror}); choose another path") from None


def show(result: Dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="alignctl eval", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    for key in ("model", "kind", "algorithm", "dataset", "rows", "reference"):
        if result.get(key):
            table.add_row(key, str(result[key]))
    for key, value in result["summary"].items():
        table.add_row(key, f"[bold]{value:.4f}[/]")
    for key, value in result["metrics"].items():
        if key not in result["summary"]:
            table.add_row(key, f"{value:.4f}")
    table.add_row("written to", str(out))
    Console().print(table)
