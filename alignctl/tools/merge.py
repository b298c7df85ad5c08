"""``alignctl merge RUN_DIR [--out DIR]``: fold a saved LoRA adapter into its base.

The result is a plain transformers model folder (safetensors weights, config, tokenizer with its
chat template) that loads with ``AutoModelForCausalLM`` (``AutoModelForSequenceClassification``
for a reward model) and needs neither peft nor the base. Written atomically: a folder appears
complete or not at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

from alignctl.errors import ConfigError
from alignctl.tools.args import parse_args

USAGE = """usage: alignctl merge RUN_DIR [--out DIR]

RUN_DIR: a run directory trained with peft=lora (its final_model/, else its newest checkpoint), or an
adapter folder. Writes base + adapter merged into DIR (default: the adapter folder's merged/, e.g.
RUN_DIR/final_model/merged, where peft.merge_on_save=true writes it too).
"""

MERGED_DIR = "merged"


def merge_command(args: List[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    parsed = parse_args(args, "merge", options=("--out",))
    if parsed.overrides or len(parsed.positional) != 1:
        given = " ".join(parsed.overrides + parsed.positional) or "nothing"
        raise ConfigError(f"merge takes one RUN_DIR and --out DIR (got {given}); see alignctl merge --help")
    out = merge(parsed.positional[0], Path(parsed.flags["--out"]) if "--out" in parsed.flags else None)
    from alignctl.tracking import console

    console.print(f"merged model written to [bold]{out}[/]", highlight=False, soft_wrap=True)
    return 0


def merge(target: str, out: Path | None = None) -> Path:
    """Merge the adapter ``target`` names; returns the folder written."""
    from alignctl.checkpoint import write_atomically
    from alignctl.tools.resolve import ARG, load_model, load_tokenizer, resolve

    saved = resolve(target)
    if saved.kind != "adapter":
        raise ConfigError(
            f"{ARG}={target}: {saved.describe()} is not a LoRA adapter, so there is nothing to merge; it already "
            "loads with from_pretrained"
        )
    out = (out or saved.folder / MERGED_DIR).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} already exists and is not empty; remove it or choose another --out")
    tokenizer = load_tokenizer(saved)
    model = load_model(saved, tokenizer)
    merged = model.merge_and_unload()

    def write(folder: Path) -> None:
        merged.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    try:
        write_atomically(out, write)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write ({exc.strerror}); choose another folder") from None
    return out
