"""The ``tiny`` model preset: a small random Llama and a tokenizer built in-process.

Nothing is downloaded. The tokenizer is a byte-level BPE trained on the text shipped with
alignctl (so it has real merges, including ones that span a prompt/answer boundary), with
ChatML special tokens and a chat template, so every data format works with it.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Iterator

import torch

from alignctl.config import ArchConfig

SMOKE_DIR = Path(__file__).resolve().parent.parent / "data" / "smoke"
# The files the tokenizer is trained on: a fixed list, so shipping another data set does not change
# the tiny tokenizer (and with it every tiny-model number).
CORPUS_FILES = (
    "smoke_chat.jsonl", "smoke_kto.jsonl", "smoke_pref.jsonl", "smoke_pref_chat.jsonl", "smoke_sft.jsonl",
    "smoke_text.jsonl",
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus() -> Iterator[str]:
    """Every string in the shipped smoke data sets, plus printable ASCII."""
    yield "".join(chr(c) for c in range(32, 127))
    for path in (SMOKE_DIR / name for name in CORPUS_FILES):
        for line in path.read_text(encoding="utf-8").splitlines():
            yield from _strings(json.loads(line))


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def build_tiny_tokenizer(vocab_size: int = 512):
    """A PreTrainedTokenizerFast: byte-level BPE, eos ``<|im_end|>``, pad ``<|pad|>``.

    Training is deterministic, so it is done once per process and callers get copies.
    """
    return copy.deepcopy(_trained_tokenizer(vocab_size))


@functools.lru_cache(maxsize=4)
def _trained_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
        model_max_length=4096,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_model(arch: ArchConfig, tokenizer, attn_implementation: str | None = None):
    """A LlamaForCausalLM with random weights seeded by ``arch.init_seed``; ``attn_implementation``
    (model.attn_implementation) is honoured like a loaded model's (None: transformers' default)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        max_position_embeddings=arch.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        attn_implementation=attn_implementation,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(arch.init_seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model
