"""A bad data row's error names the file, the row and its line, and the way out
(dataset.skip_invalid=true), on every data path; a problem of the whole setup does not."""

import pytest
from omegaconf import OmegaConf

from alignctl.algo_configs import SFTConfig
from alignctl.data.kto import build_kto_examples
from alignctl.data.load import Row
from alignctl.data.pairwise import build_pair_examples
from alignctl.data.prompts import build_prompt_examples
from alignctl.data.sft import build_sft_examples
from alignctl.errors import DataError

SOURCE = "/data/my.jsonl"
LIMITS = dict(max_length=64, max_prompt_length=16)


def rows(*records):
    return [Row(index=i, data=r, source=SOURCE, line=i + 1) for i, r in enumerate(records)]


BUILDS = {
    "sft": lambda rs, tok, skip: build_sft_examples(rs, tok, OmegaConf.structured(SFTConfig), skip),
    "pairs": lambda rs, tok, skip: build_pair_examples(rs, tok, skip_invalid=skip, **LIMITS),
    "kto": lambda rs, tok, skip: build_kto_examples(rs, tok, skip_invalid=skip, **LIMITS),
    "prompts": lambda rs, tok, skip: build_prompt_examples(rs, tok, max_prompt_length=16, skip_invalid=skip),
}
CASES = [
    ("sft", [{"prompt": "Q?", "completion": " A."}, {"prompt": "Q?", "completion": ""}], "column 'completion' is empty"),
    ("pairs", [{"prompt": "Q?", "chosen": " a", "rejected": " b"}, {"prompt": "Q?", "chosen": 3, "rejected": " b"}],
     "column 'chosen' must be a string"),
    ("kto", [{"prompt": "Q?", "completion": " a", "label": True}, {"prompt": "Q?", "completion": " b", "label": "no"}],
     "column 'label' must be true or false"),
    ("prompts", [{"prompt": "Say hi."}, {"prompt": "   "}], "column 'prompt' is empty"),
]


@pytest.mark.parametrize("kind, records, words", CASES, ids=[c[0] for c in CASES])
def test_bad_row_names_file_row_line_and_skip_invalid(tiny_tokenizer, kind, records, words):
    with pytest.raises(DataError) as caught:
        BUILDS[kind](rows(*records), tiny_tokenizer, False)
    message = str(caught.value)
    assert message.startswith(f"{SOURCE}: row 1 (line 2): ")
    assert words in message and "dataset.skip_invalid=true" in message
    assert "\n" not in message
    data = BUILDS[kind](rows(*records), tiny_tokenizer, True)
    assert data.skipped == 1


def test_missing_chat_template_is_not_a_row_to_skip(tiny_tokenizer):
    import copy

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = None
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    for skip in (False, True):
        with pytest.raises(DataError) as caught:
            BUILDS["sft"](rows({"messages": conversation}), tokenizer, skip)
        message = str(caught.value)
        assert message.startswith(f"{SOURCE}: ") and "chat template" in message
        assert "skip_invalid" not in message  # skipping rows cannot fix a tokenizer
