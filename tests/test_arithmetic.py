"""Arithmetic word problems (a verifiable-reward task): the generator, the shipped file, the reward functions."""

from __future__ import annotations

import json
import re
import string
import subprocess
import sys

import pytest
import torch

from alignctl.compose import compose_job
from alignctl.config import DatasetConfig
from alignctl.data.load import load_rows
from alignctl.data.make_arithmetic import (
    DEFAULT_OUT,
    INSTRUCTION,
    TEMPLATES,
    generate,
    main,
    render_problem,
    to_jsonl,
)
from alignctl.data.prompts import build_prompt_examples
from alignctl.errors import AlignctlError
from alignctl.rl.reward_functions import answer_format, arithmetic_correct
from alignctl.rl.rewards import RewardSources, call_reward_function
from conftest import ROOT

SHIPPED = ROOT / "alignctl" / "data" / "smoke" / "arithmetic.jsonl"

# The answer of each problem kind from its numbers, written independently of the generator.
SOLVE = {
    "add": lambda a, b, c: a + b,
    "sub": lambda a, b, c: a - b,
    "mul": lambda a, b, c: a * b,
    "add_sub": lambda a, b, c: a + b - c,
    "mul_add": lambda a, b, c: a * b + c,
    "mul_sub": lambda a, b, c: a * b - c,
}
# easy: one addition or subtraction; medium: one multiplication; hard: two operations.
DIFFICULTY = {"add": "easy", "sub": "easy", "mul": "medium", "add_sub": "hard", "mul_add": "hard", "mul_sub": "hard"}


def _template_regex(text: str) -> re.Pattern:
    """A template's text as a regex: numbers captured, words matched (a repeated placeholder must repeat)."""
    words = {"name": r"[A-Z][a-z]+", "name2": r"[A-Z][a-z]+", "pro": r"he|she", "Pro": r"He|She", "obj": r"[a-z ]+?"}
    out, seen = "", set()
    for literal, field, _, _ in string.Formatter().parse(text):
        out += re.escape(literal)
        if field is None:
            continue
        if field in seen:
            out += f"(?P={field})"
        else:
            seen.add(field)
            out += f"(?P<{field}>{r'[0-9]+' if field in 'abc' else words[field]})"
    return re.compile(out)


REGEXES = [(t.kind, _template_regex(t.text)) for t in TEMPLATES]


def _solve_from_text(problem: str):
    """(kind, answer) of a problem, re-read from its text alone."""
    found = []
    for kind, regex in REGEXES:
        m = regex.fullmatch(problem)
        if m:
            nums = {k: int(v) for k, v in m.groupdict().items() if k in ("a", "b", "c")}
            found.append((kind, SOLVE[kind](nums["a"], nums["b"], nums.get("c", 0)), nums))
    assert found, f"no template matches {problem!r}"
    assert len({(k, ans) for k, ans, _ in found}) == 1, f"ambiguous problem {problem!r}: {found}"
    return found[0]


# --------------------------------------------------------------------------- generator


def test_generator_is_deterministic_and_seed_dependent():
    assert generate(50, seed=3) == generate(50, seed=3)
    assert to_jsonl(generate(50, seed=3)) == to_jsonl(generate(50, seed=3))
    assert generate(50, seed=3) != generate(50, seed=4)
    assert generate(20, seed=3) == generate(50, seed=3)[:20]  # a prefix: more rows only append
    assert generate(0) == []
    with pytest.raises(ValueError):
        generate(-1)


def test_rows_have_the_layout_and_answers_follow_from_the_stated_numbers():
    rows = generate(500, seed=0)
    assert len(rows) == 500
    contents = [r["prompt"][0]["content"] for r in rows]
    assert len(set(contents)) == 500  # no duplicate problems
    kinds = set()
    for row in rows:
        assert set(row) == {"prompt", "answer", "difficulty"}
        prompt = row["prompt"]
        assert isinstance(prompt, list) and len(prompt) == 1 and prompt[0]["role"] == "user"
        content = prompt[0]["content"]
        assert content.endswith(" " + INSTRUCTION)
        assert isinstance(row["answer"], str) and re.fullmatch(r"[0-9]+", row["answer"])
        problem = content[: -len(INSTRUCTION) - 1]
        kind, answer, nums = _solve_from_text(problem)
        assert row["answer"] == str(answer), problem
        assert all(0 < n < 100 for n in nums.values()) and 0 < answer < 100, problem  # small integers
        assert row["difficulty"] == DIFFICULTY[kind], problem
        kinds.add(kind)
    assert kinds == set(SOLVE)  # every kind of problem occurs
    assert {r["difficulty"] for r in rows} == {"easy", "medium", "hard"}
    assert len({t.text for t in TEMPLATES}) == len(TEMPLATES) and len(TEMPLATES) >= 12


def test_render_problem_by_hand():
    add = next(t for t in TEMPLATES if t.text.startswith("{name} has {a} {obj} and buys {b} more."))
    assert render_problem(add, 7, 5) == ("Tom has 7 apples and buys 5 more. How many apples does he have now?", 12)
    groups = next(t for t in TEMPLATES if t.text.startswith("There are {a} groups of {b} {obj}. "))
    text, answer = render_problem(groups, 3, 4, obj="marbles")
    assert text == "There are 3 groups of 4 marbles. How many marbles are there altogether?" and answer == 12
    give = next(t for t in TEMPLATES if t.kind == "mul_sub" and "gives" in t.text)
    text, answer = render_problem(give, 4, 6, 5, name="Mei", pronoun="she", obj="cookies")
    assert answer == 19 and text.startswith("Mei buys 4 packs of 6 cookies and gives 5 of them away.")
    assert _solve_from_text(text)[1] == 19


def test_shipped_file_is_the_generator_output():
    assert SHIPPED == DEFAULT_OUT
    assert SHIPPED.read_text(encoding="utf-8") == to_jsonl(generate(500, seed=0)), (
        "alignctl/data/smoke/arithmetic.jsonl differs from the generator; regenerate it with "
        "python -m alignctl.data.make_arithmetic --rows 500 --seed 0 --out alignctl/data/smoke/arithmetic.jsonl"
    )


def test_module_cli_writes_the_same_file(tmp_path):
    out = tmp_path / "sub" / "a.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "alignctl.data.make_arithmetic", "--rows", "500", "--seed", "0", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == SHIPPED.read_bytes()
    small = tmp_path / "b.jsonl"
    assert main(["--rows", "7", "--seed", "1", "--out", str(small)]) == 0
    assert [json.loads(line) for line in small.read_text().splitlines()] == generate(7, seed=1)


def test_dataset_preset_loads_as_chat_prompts(tiny_tokenizer):
    cfg = compose_job(["dataset=arithmetic", "reward=arithmetic"])
    assert cfg.dataset.path == "builtin:arithmetic.jsonl" and cfg.dataset.eval_fraction == 0.0
    assert cfg.reward.weights == [1.0, 0.2] and cfg.reward.model is None
    split = load_rows(DatasetConfig(path=cfg.dataset.path, eval_fraction=0.0), seed=0)
    assert len(split.train) == 500 and split.eval is None
    data = build_prompt_examples(split.train[:20], tiny_tokenizer, max_prompt_length=256)
    assert data.format == "prompt_chat"
    for ex, row in zip(data.examples, split.train):
        assert set(ex.columns) == {"answer", "difficulty"} and ex.columns["answer"] == row.data["answer"]
        assert row.data["prompt"][0]["content"] in ex.prompt_text  # rendered with the chat template


# --------------------------------------------------------------------------- rewards


def test_arithmetic_correct():
    completions = [
        "7 + 5 = 12. <answer>12</answer>",  # correct
        "<answer>13</answer>",  # wrong
        "The answer is 12.",  # no tags: strict, no fallback
        "<answer> 12 </answer>",  # spaces
        "<answer>+12</answer>",  # leading +
        "<answer>1,234</answer>",  # thousands separators
        "<answer>1234</answer>",
        "<answer>12,34</answer>",  # not a thousands grouping
        "<answer>12 apples</answer>",  # not only an integer
        "<answer>12.0</answer>",
        "<answer>12",  # unclosed
        "<answer>13</answer> no wait <answer>12</answer>",  # the first tag counts
        "<answer>\n  12\n</answer>",
        "",
    ]
    answers = ["12", "12", "12", "12", "12", "1234", "1,234", "1234", "12", "12", "12", "12", "12", "0"]
    got = arithmetic_correct(["p"] * len(completions), completions, answer=answers)
    assert got == [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    # int answers, a negative answer, other columns swallowed
    assert arithmetic_correct(["p", "p"], ["<answer>-3</answer>", "<answer>4</answer>"], answer=[-3, 4],
                              difficulty=["easy", "easy"], completion_ids=[[1], [2]]) == [1.0, 1.0]


def test_conversational_completions():
    conv = [
        [{"role": "assistant", "content": "<answer>12</answer>"}],
        [{"role": "assistant", "content": "<answer>12</answer>"}, {"role": "assistant", "content": "so 11"}],
        [{"role": "assistant", "content": [{"type": "text", "text": "<answer>"}, {"type": "text", "text": "12</answer>"}]}],
        [],
        [{"role": "assistant", "content": None}],
    ]
    assert arithmetic_correct(["p"] * 5, conv, answer=["12"] * 5) == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert answer_format(["p"] * 5, conv) == [1.0, 0.0, 1.0, 0.0, 0.0]


def test_answer_format():
    completions = [
        "<answer>12</answer>",
        "Work: 3 * 4. <answer> 1,200 </answer>",
        "<answer>twelve</answer>",
        "<answer></answer>",
        "<answer>1</answer> <answer>2</answer>",  # two tags
        "<answer>1</answer> </answer>",  # a stray closing tag
        "12",
        "<answer>12",
        "</answer>12<answer>",  # wrong order: no closed tag
    ]
    assert answer_format(["p"] * len(completions), completions) == [1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0]


def test_missing_or_bad_answer_column_is_a_clear_error():
    with pytest.raises(ValueError, match="'answer' column"):
        arithmetic_correct(["p"], ["<answer>1</answer>"])
    with pytest.raises(ValueError, match="row 1: column 'answer'"):
        arithmetic_correct(["p", "p"], ["<answer>1</answer>"] * 2, answer=["1", "one"])
    with pytest.raises(ValueError, match="row 0: column 'answer' is None"):
        arithmetic_correct(["p"], ["<answer>1</answer>"], answer=[None])
    with pytest.raises(AlignctlError, match=r"reward function 'arithmetic_correct' raised ValueError: .*'answer' column"):
        call_reward_function(arithmetic_correct, "arithmetic_correct", ["p"], ["<answer>1</answer>"], [[1]],
                             {"difficulty": ["easy"]})


def test_reward_preset_weights_the_sources():
    cfg = compose_job(["reward=arithmetic"])
    sources = RewardSources(cfg.reward.functions, weights=cfg.reward.weights)
    assert sources.names == ["arithmetic_correct", "answer_format"]
    completions = ["<answer>12</answer>", "<answer>11</answer>", "<answer>twelve</answer>", "12"]
    result = sources(["p"] * 4, completions, [[1]] * 4, {"answer": ["12"] * 4, "difficulty": ["easy"] * 4})
    assert result.per_source["arithmetic_correct"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert result.per_source["answer_format"].tolist() == [1.0, 1.0, 0.5, 0.0]
    assert torch.allclose(result.total, torch.tensor([1.2, 0.2, 0.1, 0.0]))
