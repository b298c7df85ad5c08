"""Load the tokenizer and the causal LM a run trains.

``model.name_or_path`` may be a local directory, a hub id, or (with ``model.arch``) the built-in
tiny model. Offline, a hub id that is not in the local cache fails at once with one clear line,
instead of retrying the network for half a minute.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Dict, List, Optional
from urllib.parse import urlparse

from alignctl.config import ModelConfig
from alignctl.errors import ConfigError, ModelLoadError

ATTN_HINT = "use model.attn_implementation=sdpa (the default) or eager"
TINY_NAME = "tiny"  # model.name_or_path of the model=tiny preset (model.arch set)
NAME_KEY, TOKENIZER_KEY, REF_KEY = "model.name_or_path", "model.tokenizer_name_or_path", "model.ref_name_or_path"
_warned_remote_code: set = set()


def check_model_config(cfg: ModelConfig) -> None:
    """Refuse model settings that would be ignored or cannot load, before anything is loaded or written:
    a path given beside ``model.arch`` (the tiny preset), an unknown attention kernel, a local path
    that does not exist (named by its key)."""
    if cfg.arch is not None:
        given = [(NAME_KEY, cfg.name_or_path), ("model.gguf_file", cfg.gguf_file)]
        for key, value in given + [(TOKENIZER_KEY, cfg.tokenizer_name_or_path)]:
            if value and not (key == NAME_KEY and value in (TINY_NAME, "???")):  # "???": unset (MISSING)
                raise ConfigError(
                    f"{key}={value}: model.arch is set (the model=tiny preset builds a random model and its own "
                    f"tokenizer), so this would be ignored; add model.arch=null to load {value}, or pick a model "
                    f"preset (model={'|'.join(_hub_presets())}) and set {key} there"
                )
    check_attn_implementation(cfg.attn_implementation)
    if cfg.arch is None:
        _check_local(NAME_KEY, cfg.name_or_path)
        if cfg.gguf_file:
            _gguf_location(cfg)
    _check_local(TOKENIZER_KEY, cfg.tokenizer_name_or_path)
    _check_local(REF_KEY, cfg.ref_name_or_path)


def check_attn_implementation(value: Optional[str]) -> None:
    """``model.attn_implementation`` must be a kernel transformers knows (or a hub kernel ``org/repo``)."""
    if value is None:
        return
    from transformers.integrations.hub_kernels import is_kernel
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    valid = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    if value not in valid and not is_kernel(value):
        raise ConfigError(
            f"model.attn_implementation={value}: unknown attention implementation; use one of {', '.join(valid)} "
            "(or a hub kernel 'org/repo'), or null for the default (sdpa)"
        )


def _hub_presets() -> List[str]:
    from alignctl.compose import list_presets

    return [name for name in list_presets("model") if name != TINY_NAME] or ["<preset>"]


def _check_local(key: str, value: Optional[str]) -> None:
    if value and not Path(value).expanduser().exists() and _looks_like_path(value):
        raise ModelLoadError(f"{key}={value}: no such directory")


def load_tokenizer(cfg: ModelConfig):
    """Tokenizer with a pad token (EOS is used when the model has none)."""
    if cfg.arch is not None:
        check_model_config(cfg)
        from alignctl.models.tiny import build_tiny_tokenizer

        return build_tiny_tokenizer(cfg.arch.vocab_size)
    from transformers import AutoTokenizer

    source = cfg.tokenizer_name_or_path or cfg.name_or_path
    key = TOKENIZER_KEY if cfg.tokenizer_name_or_path else NAME_KEY
    kwargs: Dict[str, Any] = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_file and not cfg.tokenizer_name_or_path:
        source, kwargs["gguf_file"] = _gguf_location(cfg)
    tokenizer = _from_pretrained(AutoTokenizer, source, kwargs, what="tokenizer", key=key)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_reward_model(cfg: ModelConfig, tokenizer, *, extra_kwargs=None):
    """A sequence classifier with one output (the scalar reward), from the policy's weights/architecture."""
    if cfg.arch is not None:
        from transformers import LlamaForSequenceClassification

        base = _tiny_model(cfg, tokenizer)
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
        if cfg.attn_implementation:
            kwargs["attn_implementation"] = cfg.attn_implementation
        if cfg.gguf_file:
            source, kwargs["gguf_file"] = _gguf_location(cfg)
        model = _from_pretrained(AutoModelForSequenceClassification, source, kwargs, what="model")
        _detach_gguf_quantizer(model, bool(cfg.gguf_file))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def load_causal_lm(
    cfg: ModelConfig, tokenizer, *, name_or_path: str | None = None, extra_kwargs=None, key: str | None = None
):
    """The causal LM in fp32 (mixed precision autocasts on top; the master weights stay fp32).

    ``name_or_path`` loads another model with the same settings (e.g. a reference model); ``key`` is
    the config key it came from, for messages (default: model.ref_name_or_path when it is that one);
    ``extra_kwargs`` go to from_pretrained (e.g. a 4-bit quantization config).
    """
    if cfg.arch is not None and name_or_path is None:
        return _tiny_model(cfg, tokenizer)
    from transformers import AutoModelForCausalLM

    if key is None:
        key = REF_KEY if name_or_path is not None and name_or_path == cfg.ref_name_or_path else NAME_KEY
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
    model = _from_pretrained(AutoModelForCausalLM, source, kwargs, what="model", key=key)
    _detach_gguf_quantizer(model, bool(kwargs.get("gguf_file")))
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _tiny_model(cfg: ModelConfig, tokenizer):
    """The built-in random model (model.arch), honouring model.attn_implementation."""
    from alignctl.models.tiny import build_tiny_model

    check_model_config(cfg)
    try:
        return build_tiny_model(cfg.arch, tokenizer, attn_implementation=cfg.attn_implementation)
    except (ImportError, ValueError) as exc:  # e.g. flash_attention_2 without flash-attn, or on a CPU
        raise ModelLoadError(
            f"model.attn_implementation={cfg.attn_implementation}: {_first_line(exc).rstrip('.')}; {ATTN_HINT}"
        ) from None


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


def _from_pretrained(auto_cls, source: str, kwargs: Dict[str, Any], what: str, key: str = NAME_KEY):
    """``auto_cls.from_pretrained``, with one clear line (naming ``key``) for what can go wrong."""
    path = Path(source).expanduser()
    is_local = path.exists()
    if not is_local and _looks_like_path(source):
        raise ModelLoadError(f"{key}={source}: no such directory")
    if is_local and path.is_dir() and not kwargs.get("gguf_file") and not _has_model_config(path, what):
        kind = "tokenizer" if key == TOKENIZER_KEY else "model"
        files = "tokenizer.json / tokenizer_config.json" if kind == "tokenizer" else "config.json"
        hint = "a tokenizer or model folder" if kind == "tokenizer" else "a saved model (e.g. a run's final_model/)"
        raise ModelLoadError(
            f"{key}={source} is not a transformers {kind} directory (no {files}); point {key} at {hint}, "
            "or set model.gguf_file for a GGUF file in it"
        )
    if kwargs.get("trust_remote_code"):
        _warn_remote_code(source, key)
    if is_local and path.is_dir():
        _check_safetensors(path, key)
    if not is_local:
        try:  # the local Hugging Face cache first: fast, and works offline
            return _checked(auto_cls.from_pretrained(source, local_files_only=True, **kwargs), source, key)
        except ModelLoadError:
            raise
        except Exception:  # not cached (or incomplete): the hub is the only place left
            pass
        if not _hub_reachable():
            raise ModelLoadError(
                f"{key}={source}: {what} '{source}' is not a local directory nor in the local Hugging Face cache, "
                f"and the hub cannot be reached: set {key} to a local directory (or model.gguf_file to a GGUF "
                "file), or go online"
            )
    try:
        loaded = auto_cls.from_pretrained(str(path) if is_local else source, **kwargs)
    except (ImportError, OSError, ValueError) as exc:
        message = _first_line(exc)
        attn = kwargs.get("attn_implementation")
        if attn and ("attention" in message.lower() or "attn" in message.lower()):  # e.g. flash-attn missing
            raise ModelLoadError(f"model.attn_implementation={attn}: {message.rstrip('.')}; {ATTN_HINT}") from None
        # e.g. a GGUF file without the gguf package
        hint = ' (pip install -e ".[gguf]")' if isinstance(exc, ImportError) and kwargs.get("gguf_file") else ""
        raise ModelLoadError(f"{key}={source}: cannot load {what}: {message}{hint}") from None
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":
            raise
        raise ModelLoadError(
            f"{key}={source}: a weights file is corrupt ({_first_line(exc)}); re-save or re-download the model"
        ) from None
    return _checked(loaded, source, key)


def _warn_remote_code(source: str, key: str) -> None:
    """One line, once per repository and process (the main one), before its code runs."""
    if source in _warned_remote_code or os.environ.get("RANK", "0") != "0":
        return
    _warned_remote_code.add(source)
    from alignctl.tracking import console

    console.print(
        f"[yellow]warning:[/] model.trust_remote_code=true: Python code shipped with '{source}' ({key}) will run "
        "on this machine; only use it for repositories you trust",
        highlight=False,
        soft_wrap=True,
    )


def _check_safetensors(folder: Path, key: str) -> None:
    """Each safetensors file in ``folder`` has a readable header that fits the file (not truncated)."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(
                f"{key}={folder}: weights file {file.name} is corrupt or truncated ({_first_line(exc)}); "
                "re-save or re-download the model"
            ) from None


def _checked(model, source: str, key: str):
    """A loaded model whose floating weights are all finite (random bytes in a weights file are not)."""
    import torch

    named = getattr(model, "named_parameters", None)
    if named is None:  # a tokenizer or a config
        return model
    with torch.no_grad():
        for name, tensor in [*named(), *model.named_buffers()]:
            if tensor.is_floating_point() and tensor.device.type != "meta" and not torch.isfinite(tensor).all():
                where = _weights_file_of(Path(source).expanduser(), name)
                raise ModelLoadError(
                    f"{key}={source}: weight '{name}' holds NaN or inf values after loading, so the weights file "
                    f"{where} is corrupt; re-save or re-download the model"
                )
    return model


def _weights_file_of(folder: Path, name: str) -> str:
    """The safetensors file in ``folder`` holding tensor ``name`` (or a suffix of it), else the folder."""
    if not folder.is_dir():
        return "(in the Hugging Face cache)"
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as weights:
                if any(name == k or name.endswith("." + k) or k.endswith("." + name) for k in weights.keys()):
                    return str(file)
        except Exception:
            continue
    return f"in {folder}"


def _has_model_config(folder: Path, what: str = "model") -> bool:
    """A transformers model (config.json) or a saved peft adapter (adapter_config.json); a tokenizer
    folder may hold only tokenizer files."""
    names = ["config.json", "adapter_config.json"]
    if what == "tokenizer":
        names += ["tokenizer_config.json", "tokenizer.json"]
    return any((folder / name).is_file() for name in names)


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
