"""Load the tokenizer and the causal LM a run trains.

``model.name_or_path`` may be a local directory, a hub id, or (with ``model.arch``) the built-in
tiny model. Offline, a hub id that is not in the local cache fails at once with one clear line,
instead of retrying the network for half a minute.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Dict
from urllib.parse import urlparse

from alignctl.config import ModelConfig
from alignctl.errors import ModelLoadError


def load_tokenizer(cfg: ModelConfig):
    """Tokenizer with a pad token (EOS is used when the model has none)."""
    if cfg.arch is not None:
        from alignctl.models.tiny import build_tiny_tokenizer

        return build_tiny_tokenizer(cfg.arch.vocab_size)
    from transformers import AutoTokenizer

    source = cfg.tokenizer_name_or_path or cfg.name_or_path
    kwargs: Dict[str, Any] = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_file and not cfg.tokenizer_name_or_path:
        source, kwargs["gguf_file"] = _gguf_location(cfg)
    tokenizer = _from_pretrained(AutoTokenizer, source, kwargs, what="tokenizer")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_reward_model(cfg: ModelConfig, tokenizer, *, extra_kwargs=None):
    """A sequence classifier with one output (the scalar reward), from the policy's weights/architecture."""
    if cfg.arch is not None:
        from transformers import LlamaForSequenceClassification

        from alignctl.models.tiny import build_tiny_model

        base = build_tiny_model(cfg.arch, tokenizer)
        base.config.num_labels = 1
        model = LlamaForSequenceClassification(base.config)
        model.model.load_state_dict(base.model.state_dict())
    else:
        from transformers import AutoModelForSequenceClassification

        source = cfg.name_or_path
        kwargs: Dict[str, Any] = {
            "revision": cfg.revision,
            "trust_remote_code": cfg.trust_remote_code,
            "dtype": "float32",
            "num_labels": 1,
            **(extra_kwargs or {}),
        }
        if cfg.gguf_file:
            source, kwargs["gguf_file"] = _gguf_location(cfg)
        model = _from_pretrained(AutoModelForSequenceClassification, source, kwargs, what="model")
        _detach_gguf_quantizer(model, bool(cfg.gguf_file))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def load_causal_lm(cfg: ModelConfig, tokenizer, *, name_or_path: str | None = None, extra_kwargs=None):
    """The causal LM in fp32 (mixed precision autocasts on top; the master weights stay fp32).

    ``name_or_path`` loads another model with the same settings (e.g. a reference model);
    ``extra_kwargs`` go to from_pretrained (e.g. a 4-bit quantization config).
    """
    if cfg.arch is not None and name_or_path is None:
        from alignctl.models.tiny import build_tiny_model

        return build_tiny_model(cfg.arch, tokenizer)
    from transformers import AutoModelForCausalLM

    source = name_or_path or cfg.name_or_path
    kwargs: Dict[str, Any] = {
        "revision": cfg.revision,
        "trust_remote_code": cfg.trust_remote_code,
        "dtype": "float32",
        **(extra_kwargs or {}),
    }
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.gguf_file and name_or_path is None:
        source, kwargs["gguf_file"] = _gguf_location(cfg)
    model = _from_pretrained(AutoModelForCausalLM, source, kwargs, what="model")
    _detach_gguf_quantizer(model, bool(kwargs.get("gguf_file")))
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _detach_gguf_quantizer(model, from_gguf: bool) -> None:
    """GGUF weights are dequantized to fp32 on load; drop the quantizer so the model trains and
    saves as a plain transformers model (safetensors)."""
    if from_gguf and getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False


def _gguf_location(cfg: ModelConfig):
    """(folder, file name) of the GGUF file, whether given as a name inside name_or_path or a path."""
    file = Path(cfg.gguf_file).expanduser()
    if file.is_absolute() or file.exists():
        if not file.is_file():
            raise ModelLoadError(f"model.gguf_file={cfg.gguf_file}: no such file")
        return str(file.resolve().parent), file.name
    folder = Path(cfg.name_or_path).expanduser()
    if folder.is_dir() and not (folder / cfg.gguf_file).is_file():
        raise ModelLoadError(f"model.gguf_file={cfg.gguf_file}: no such file in {folder}")
    return cfg.name_or_path, cfg.gguf_file


def _from_pretrained(auto_cls, source: str, kwargs: Dict[str, Any], what: str):
    path = Path(source).expanduser()
    is_local = path.exists()
    if not is_local and _looks_like_path(source):
        raise ModelLoadError(f"model.name_or_path={source}: no such directory")
    if is_local and path.is_dir() and not kwargs.get("gguf_file") and not _has_model_config(path):
        raise ModelLoadError(
            f"{source} is not a transformers model directory (no config.json); point model.name_or_path at a "
            "saved model (e.g. a run's final_model/), or set model.gguf_file for a GGUF file in it"
        )
    if not is_local:
        try:  # the local Hugging Face cache first: fast, and works offline
            return auto_cls.from_pretrained(source, local_files_only=True, **kwargs)
        except Exception:  # not cached (or incomplete): the hub is the only place left
            pass
        if not _hub_reachable():
            raise ModelLoadError(
                f"{what} '{source}' is not a local directory nor in the local Hugging Face cache, and the "
                "hub cannot be reached: set model.name_or_path to a local directory (or model.gguf_file "
                "to a GGUF file), or go online"
            )
    try:
        return auto_cls.from_pretrained(str(path) if is_local else source, **kwargs)
    except ImportError as exc:  # e.g. a GGUF file without the gguf package
        hint = ' (pip install -e ".[gguf]")' if kwargs.get("gguf_file") else ""
        raise ModelLoadError(f"cannot load {what} from '{source}': {_first_line(exc)}{hint}") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load {what} from '{source}': {_first_line(exc)}") from None


def _has_model_config(folder: Path) -> bool:
    """A transformers model (config.json) or a saved peft adapter (adapter_config.json)."""
    return (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _looks_like_path(text: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else that does not exist is a missing path."""
    return text.startswith((".", "/", "~")) or text.count("/") > 1


def _hub_reachable(timeout: float = 2.0) -> bool:
    """A quick TCP check of the hub endpoint (offline mode counts as unreachable)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False
