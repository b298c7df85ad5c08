"""``alignctl generate`` and ``alignctl chat``: try a trained model.

Both sample with ``rollout.generate`` (the online algorithms' batched generation) under the
``generation`` group's settings, with the prompt rendered by the tokenizer's chat template when it
has one. Without a template, chat keeps a plain "User:/Assistant:" transcript and stops a reply at
the next "User:" turn.
"""

from __future__ import annotations

import sys
from typing import Dict, List, Sequence

import torch

from alignctl.errors import ConfigError
from alignctl.tools.args import Parsed, int_flag, override_key, parse_args

GENERATE_USAGE = """usage: alignctl generate MODEL_OR_RUN_DIR PROMPT [PROMPT ...] [generation.KEY=VALUE ...] [--raw] [--seed N]

MODEL_OR_RUN_DIR: a run directory (its final_model/, else its newest checkpoint), a saved model folder
(full or LoRA adapter), a .gguf file, or a hub id. Several prompts are answered in one batch.
Sampling: the generation group (generation.temperature=0.7 generation.max_new_tokens=128
generation.do_sample=false ...). A GGUF file: its path, or its folder plus model.gguf_file=NAME. The prompt goes through the tokenizer's chat template as a user turn
when it has one; --raw feeds it as plain text. --prompt TEXT passes a prompt that looks like key=value.
"""

CHAT_USAGE = """usage: alignctl chat MODEL_OR_RUN_DIR [generation.KEY=VALUE ...] [--seed N]

An interactive conversation on stdin: the history is kept and rendered with the tokenizer's chat
template. /reset clears the history; /exit (or end of input, Ctrl-D) ends.
"""

GGUF_KEY = "model.gguf_file"  # MODEL_OR_RUN_DIR a folder + model.gguf_file=NAME, as in training
TRANSCRIPT_STOP = "\nUser:"  # where a reply ends in a plain transcript (no chat template)


def generate_command(args: List[str]) -> int:
    if _wants_help(args):
        print(GENERATE_USAGE)
        return 0
    parsed = parse_args(args, "generate", options=("--seed",), switches=("--raw",), repeatable=("--prompt",))
    if not parsed.positional:
        raise ConfigError("generate needs MODEL_OR_RUN_DIR and a prompt; see alignctl generate --help")
    prompts = parsed.positional[1:] + parsed.repeated.get("--prompt", [])
    if not prompts:
        raise ConfigError(f"generate {parsed.positional[0]}: give a prompt to answer, e.g. alignctl generate RUN_DIR \"Hello\"")
    if any(not p.strip() for p in prompts):
        raise ConfigError("generate: a prompt is empty; give text to answer")
    settings = generation_settings(parsed, "generate")
    model, tokenizer = load_causal(parsed.positional[0], parsed.overrides)
    raw = bool(parsed.flags.get("--raw"))
    rendered = [render([{"role": "user", "content": p}], tokenizer, raw=raw) for p in prompts]
    replies = sample(model, tokenizer, rendered, settings)
    for i, (prompt, reply) in enumerate(zip(prompts, replies)):
        if len(prompts) > 1:
            print(f"### {i + 1}: {prompt}")
        print(reply)
    return 0


def chat_command(args: List[str]) -> int:
    if _wants_help(args):
        print(CHAT_USAGE)
        return 0
    parsed = parse_args(args, "chat", options=("--seed",))
    if len(parsed.positional) != 1:
        raise ConfigError("chat takes one MODEL_OR_RUN_DIR (and generation.* settings); see alignctl chat --help")
    settings = generation_settings(parsed, "chat")
    model, tokenizer = load_causal(parsed.positional[0], parsed.overrides)
    templated = bool(getattr(tokenizer, "chat_template", None))
    if not templated:
        settings.stop_strings = [*settings.stop_strings, TRANSCRIPT_STOP]
    limit = _context_limit(model)
    interactive = sys.stdin.isatty()
    print(f"chatting with {parsed.positional[0]} ({'chat template' if templated else 'plain transcript, no chat template'}); "
          "/reset clears the history, /exit or Ctrl-D ends", file=sys.stderr)
    history: List[Dict[str, str]] = []
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = []
            print("(history cleared)", file=sys.stderr)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": line})
        prompt, dropped = fit_history(history, tokenizer, limit - settings.max_new_tokens)
        if dropped:
            print(f"(the oldest {dropped} message(s) no longer fit the context and are left out)", file=sys.stderr)
        reply = sample(model, tokenizer, [prompt], settings)[0]
        history.append({"role": "assistant", "content": reply})
        print(f"assistant> {reply}", flush=True)
    return 0


def _wants_help(args: Sequence[str]) -> bool:
    return any(a in ("-h", "--help") for a in args)


def generation_settings(parsed: Parsed, command: str):
    """The generation group with the command line's generation.* overrides; --seed seeds sampling."""
    from alignctl.compose import compose_job
    from alignctl.rollout.generate import GenerationSettings

    overrides = [o for o in parsed.overrides if override_key(o) != GGUF_KEY]
    for item in overrides:
        key = override_key(item)
        if key != "generation" and not key.startswith("generation."):
            raise ConfigError(
                f"{item}: {command} takes only generation.* settings (e.g. generation.temperature=0.7) "
                f"and {GGUF_KEY}"
            )
    settings = GenerationSettings.from_config(compose_job(overrides).generation)
    seed = int_flag(parsed, "--seed")
    if seed is not None:
        torch.manual_seed(seed)
    return settings


def load_causal(target: str, overrides: Sequence[str] = ()):
    """(model, tokenizer) of MODEL_OR_RUN_DIR (with ``model.gguf_file=`` among ``overrides``), on the
    GPU when there is one; refuses a reward model."""
    from alignctl.tools.resolve import ARG, load_model, load_tokenizer, resolve_args

    saved, _ = resolve_args(target, list(overrides))
    if saved.is_reward_model:
        raise ConfigError(
            f"{ARG}={target} is a reward model (a sequence classifier), which scores text and does not generate; "
            "score pairs with alignctl eval, or point at a policy"
        )
    tokenizer = load_tokenizer(saved)
    model = load_model(saved, tokenizer)
    if torch.cuda.is_available():
        model.to("cuda")
    return model, tokenizer


def render(messages: List[Dict[str, str]], tokenizer, raw: bool = False, transcript: bool = False) -> List[int]:
    """Prompt ids: the chat template with the assistant cue; without a template, a plain
    "User:/Assistant:" transcript (``transcript``, for chat) or the last message's text as is."""
    from alignctl.data.encode import encode_prompt, render_chat_prompt

    if raw:
        return encode_prompt(tokenizer, messages[-1]["content"])
    if getattr(tokenizer, "chat_template", None):
        # as training tokenizes a templated prompt: the template's text as is, no BOS added
        return tokenizer(render_chat_prompt(tokenizer, messages, 0), add_special_tokens=False)["input_ids"]
    if not transcript:
        text = messages[-1]["content"]
    else:
        turns = [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages]
        text = "\n".join(turns) + "\nAssistant:"
    return encode_prompt(tokenizer, text)


def fit_history(history: List[Dict[str, str]], tokenizer, budget: int):
    """(prompt ids, messages dropped): the oldest exchanges are left out until the prompt fits ``budget``."""
    start = 0
    ids = render(history, tokenizer, transcript=True)
    while len(ids) > budget and start < len(history) - 1:
        start += 2 if start + 2 < len(history) else 1
        ids = render(history[start:], tokenizer, transcript=True)
    if len(ids) > budget:
        raise ConfigError(
            f"chat: the message is {len(ids)} tokens, more than the model's context leaves for a reply "
            f"({budget}); send a shorter one or lower generation.max_new_tokens"
        )
    del history[:start]
    return ids, start


def sample(model, tokenizer, prompts: List[List[int]], settings) -> List[str]:
    """One reply per prompt (ids), sampled in one batch."""
    from alignctl.rollout.generate import generate, left_pad

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = left_pad(prompts, pad)
    limit = _context_limit(model)
    if ids.shape[1] + settings.max_new_tokens > limit:
        raise ConfigError(
            f"the prompt ({ids.shape[1]} tokens) plus generation.max_new_tokens={settings.max_new_tokens} exceeds the "
            f"model's context of {limit} tokens; shorten the prompt or lower generation.max_new_tokens"
        )
    return generate(model, tokenizer, ids, mask, settings).texts


def _context_limit(model) -> int:
    from alignctl.models.logps import unwrap_causal_lm

    config = unwrap_causal_lm(model).config
    return int(getattr(config, "max_position_embeddings", None) or 1 << 30)
