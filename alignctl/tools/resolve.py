"""MODEL_OR_RUN_DIR -> a loaded model and tokenizer, for the commands that use a trained model.

Accepted: a run directory (its ``final_model/``, else its newest complete checkpoint's model), a
checkpoint folder, a saved model folder (full weights or a LoRA adapter, which loads over the base
its ``adapter_config.json`` names), a ``.gguf`` file, or a hub id (offline, only from the local
cache). Everything that cannot be used is one ModelLoadError naming the argument and the fix.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

from alignctl.checkpoint import STATE_FILE, list_checkpoints
from alignctl.errors import ModelLoadError
from alignctl.models.saved import ADAPTER_CONFIG, BASE_DIR
from alignctl.run_dir import CONFIG_FILE, FINAL_MODEL, is_run_dir

ARG = "MODEL_OR_RUN_DIR"


@dataclass
class SavedModel:
    """Where a model comes from, before anything heavy is loaded."""

    source: str  # what the user typed (hub id or path)
    folder: Optional[Path]  # the model folder (None for a hub id)
    kind: str  # full | adapter | gguf | hub
    run_dir: Optional[Path] = None
    run_config: Optional[DictConfig] = None  # the training run's config.yaml, when known
    gguf_file: Optional[str] = None

    @property
    def adapter_config(self) -> Dict[str, Any]:
        return _read_json(self.folder / ADAPTER_CONFIG) if self.kind == "adapter" else {}

    @property
    def is_reward_model(self) -> bool:
        """A one-output sequence classifier (a reward model), not a causal LM."""
        if self.kind == "adapter":
            return str(self.adapter_config.get("task_type")) == "SEQ_CLS"
        if self.kind == "full":
            config = _read_json(self.folder / "config.json")
            return any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])
        return False

    def run_model_setting(self, name: str):
        """A ``model.*`` setting of the training run (None when no run config is known)."""
        if self.run_config is None or "model" not in self.run_config:
            return None
        return self.run_config.model.get(name)

    def load_kwargs(self) -> Dict[str, Any]:
        """from_pretrained settings carried over from the training run: its consent to run the
        model's own code (``model.trust_remote_code``), which the model cannot load without."""
        kwargs: Dict[str, Any] = {}
        if self.run_model_setting("trust_remote_code"):
            kwargs["trust_remote_code"] = True
        return kwargs

    def describe(self) -> str:
        what = {"full": "full model", "adapter": "LoRA adapter", "gguf": "GGUF file", "hub": "hub model"}[self.kind]
        return f"{what} {self.folder / self.gguf_file if self.gguf_file else self.folder or self.source}"


def resolve(target: str) -> SavedModel:
    """Find the model ``target`` names (no weights are read)."""
    from alignctl.models.load import _looks_like_path

    path = Path(target).expanduser()
    if not path.exists():
        if _looks_like_path(target) or target.endswith(".gguf"):
            raise ModelLoadError(f"{ARG}={target}: no such file or directory")
        return SavedModel(target, None, "hub")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(
                f"{ARG}={target} is a file; give a run directory, a model folder, a .gguf file or a hub id"
            )
        return SavedModel(target, path.resolve().parent, "gguf", gguf_file=path.name)
    if is_run_dir(path):
        return _from_run_dir(target, path)
    if (path / STATE_FILE).is_file() and (path / "model").is_dir():  # a checkpoint folder
        return _model_folder(target, path / "model", run_dir=path.parent.parent)
    return _model_folder(target, path)


def resolve_args(target: str, overrides: List[str]) -> Tuple[SavedModel, List[str]]:
    """``resolve``, also taking the training form of a GGUF file: MODEL_OR_RUN_DIR a folder plus
    ``model.gguf_file=NAME`` (consumed; the other overrides are returned)."""
    gguf = [o for o in overrides if o.lstrip("+").startswith("model.gguf_file=")]
    rest = [o for o in overrides if o not in gguf]
    if not gguf:
        return resolve(target), rest
    name = gguf[-1].partition("=")[2]
    folder = Path(target).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"{gguf[-1]}: MODEL_OR_RUN_DIR={target} must then be the folder holding the file")
    file = Path(name).expanduser()
    path = file if file.is_absolute() else folder / file
    if not path.is_file():
        raise ModelLoadError(f"{gguf[-1]}: no such file in {folder}")
    return resolve(str(path)), rest


def _from_run_dir(target: str, run_dir: Path) -> SavedModel:
    if (run_dir / FINAL_MODEL).is_dir():
        return _model_folder(target, run_dir / FINAL_MODEL, run_dir=run_dir)
    checkpoints = [c for c in list_checkpoints(run_dir) if (c / "model").is_dir()]
    if not checkpoints:
        raise ModelLoadError(
            f"{ARG}={target}: the run directory holds no model yet (no {FINAL_MODEL}/ and no complete checkpoint); "
            "let the run finish or save a checkpoint (train.save_steps), or point at a model folder"
        )
    return _model_folder(target, checkpoints[-1] / "model", run_dir=run_dir)


def _model_folder(target: str, folder: Path, run_dir: Optional[Path] = None) -> SavedModel:
    if (folder / ADAPTER_CONFIG).is_file():
        kind = "adapter"
    elif (folder / "config.json").is_file():
        kind = "full"
    elif (folder / "model_index.json").is_file() or (folder / "pytorch_lora_weights.safetensors").is_file():
        raise ModelLoadError(
            f"{ARG}={target}: {folder} holds a diffusion pipeline (a DDPO run); load it with diffusers "
            "(StableDiffusionPipeline.from_pretrained / load_lora_weights), not with this command"
        )
    else:
        raise ModelLoadError(
            f"{ARG}={target}: {folder} is neither a run directory nor a saved model (no run.json, config.json or "
            f"{ADAPTER_CONFIG}); point at a run directory, its {FINAL_MODEL}/, a model folder or a hub id"
        )
    run_dir = run_dir or _owning_run(folder)
    config = _run_config(folder, run_dir)
    return SavedModel(target, folder, kind, run_dir=run_dir, run_config=config)


def _owning_run(folder: Path) -> Optional[Path]:
    """The run directory a model folder sits in (RUN/final_model, RUN/checkpoints/step-N/model)."""
    folder = folder.resolve()
    if folder.name == FINAL_MODEL:
        owner = folder.parent
    elif folder.name == "model" and folder.parent.name.startswith("step-"):
        owner = folder.parents[2]
    else:
        return None
    return owner if is_run_dir(owner) else None


def _run_config(folder: Path, run_dir: Optional[Path]) -> Optional[DictConfig]:
    """The training config saved with the model (final_model/config.yaml) or in its run directory."""
    for path in (folder / CONFIG_FILE, *([run_dir / CONFIG_FILE] if run_dir else [])):
        if path.is_file():
            try:
                return OmegaConf.load(path)
            except Exception as exc:  # a damaged file: say which
                raise ModelLoadError(f"{path} cannot be read ({str(exc).splitlines()[0]}); repair or remove it") from None
    return None


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} cannot be read ({exc}); re-save the model") from None


# ---------------------------------------------------------------------------------------- loading
def load_tokenizer(saved: SavedModel):
    """The tokenizer saved with the model (or its base, or its run's), with a pad token."""
    from transformers import AutoTokenizer

    from alignctl.models.load import _from_pretrained

    kwargs = saved.load_kwargs()
    if saved.kind == "hub":
        source = saved.source
    elif saved.kind == "gguf":
        source, kwargs["gguf_file"] = str(saved.folder), saved.gguf_file
    else:
        source = _tokenizer_folder(saved)
    if source is None:  # nothing saved with the model: the run's own tokenizer
        from alignctl.models.load import load_tokenizer as load_run_tokenizer

        return load_run_tokenizer(saved.run_config.model)
    tokenizer = _from_pretrained(AutoTokenizer, source, kwargs, what="tokenizer", key=ARG)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tokenizer_folder(saved: SavedModel) -> Optional[str]:
    candidates = [saved.folder]
    if saved.kind == "adapter":
        candidates.append(saved.folder / BASE_DIR)
        recorded = saved.adapter_config.get("base_model_name_or_path")
        if recorded:
            candidates.append(Path(recorded))
    for folder in candidates:
        if any((folder / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json")):
            return str(folder)
    if saved.run_config is not None:
        return None
    raise ModelLoadError(f"{ARG}={saved.source}: no tokenizer saved in {saved.folder}; save one beside the model")


def load_model(saved: SavedModel, tokenizer):
    """The model in fp32, eval mode: a causal LM, or a one-output classifier for a reward model.
    An adapter comes back as a peft model over its base."""
    reward = saved.is_reward_model
    if saved.kind == "adapter":
        model = _load_adapter(saved, tokenizer, reward)
    else:
        source = saved.source if saved.kind == "hub" else str(saved.folder)
        kwargs = _model_kwargs(saved)
        if saved.gguf_file:
            kwargs["gguf_file"] = saved.gguf_file
        model = _load_plain(source, kwargs, reward, key=ARG)
        from alignctl.models.load import _detach_gguf_quantizer

        _detach_gguf_quantizer(model, bool(saved.gguf_file))
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def _model_kwargs(saved: SavedModel) -> Dict[str, Any]:
    """fp32 weights, with the run's remote-code consent. The attention kernel is left to
    transformers: this machine may lack the one training used (flash-attention on a GPU)."""
    return {"dtype": "float32", **saved.load_kwargs()}


def _load_plain(source: str, kwargs: Dict[str, Any], reward: bool, key: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from alignctl.models.load import _from_pretrained

    auto = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    return _from_pretrained(auto, source, kwargs, what="model", key=key)


def _load_adapter(saved: SavedModel, tokenizer, reward: bool):
    """The base the adapter names (or the copy saved beside it, or the run's own base), then the adapter."""
    from peft import PeftModel

    base = base_model(saved, tokenizer, reward)
    try:
        with warnings.catch_warnings():  # peft calls an attribute transformers has deprecated
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return PeftModel.from_pretrained(base, str(saved.folder), is_trainable=False)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(
            f"{ARG}={saved.source}: the adapter in {saved.folder} does not fit its base ({str(exc).splitlines()[0]})"
        ) from None


def base_model(saved: SavedModel, tokenizer, reward: bool = False):
    """The base model of an adapter, without the adapter."""
    from alignctl.models.load import _looks_like_path

    recorded = saved.adapter_config.get("base_model_name_or_path")
    beside = saved.folder / BASE_DIR
    if recorded and Path(recorded).is_dir():
        source = recorded
    elif beside.is_dir():  # the run directory was moved: the recorded absolute path is stale
        source = str(beside)
    elif recorded and not _looks_like_path(recorded):  # a hub id
        source = recorded
    elif saved.run_config is not None:  # saved before bases were recorded: rebuild it as the run did
        return _base_from_run(saved.run_config, tokenizer, reward)
    else:
        raise ModelLoadError(
            f"{ARG}={saved.source}: the adapter's base ({recorded or 'not recorded'}) cannot be found and no run "
            f"config is saved with it; set base_model_name_or_path in {saved.folder / ADAPTER_CONFIG} to the base model"
        )
    kwargs = _model_kwargs(saved)
    revision = saved.adapter_config.get("revision")
    if not revision and recorded == saved.run_model_setting("name_or_path"):
        revision = saved.run_model_setting("revision")  # the run trained over this revision of its base
    if revision and source == recorded:
        kwargs["revision"] = revision
    return _load_plain(source, kwargs, reward, key=f"{ADAPTER_CONFIG} base_model_name_or_path")


def _base_from_run(run_config: DictConfig, tokenizer, reward: bool):
    from alignctl.models.load import load_causal_lm, load_reward_model

    from alignctl.config import ModelConfig

    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), run_config.model)
    return load_reward_model(cfg, tokenizer) if reward else load_causal_lm(cfg, tokenizer)
