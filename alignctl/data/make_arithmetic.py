"""Generate arithmetic word problems with verifiable integer answers (a small GRPO example task).

Each row is::

    {"prompt": [{"role": "user", "content": "<problem> Give the final answer as <answer>NUMBER</answer>."}],
     "answer": "12", "difficulty": "easy"}

``prompt`` is a one-message conversation, so an instruct model's chat template is used;
``answer`` is the integer answer as a string (read by
``alignctl.rl.reward_functions:arithmetic_correct``); ``difficulty`` is ``easy`` (one addition or
subtraction), ``medium`` (one multiplication) or ``hard`` (two operations). Numbers are small
non-negative integers written as digits, and every answer is >= 0.

Pure Python and deterministic: the same ``--rows`` and ``--seed`` give the same file, byte for
byte (``random.Random(seed)`` only). The shipped ``alignctl/data/smoke/arithmetic.jsonl`` is::

    python -m alignctl.data.make_arithmetic --rows 500 --seed 0 --out alignctl/data/smoke/arithmetic.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

__all__ = [
    "DEFAULT_OUT",
    "DIFFICULTIES",
    "INSTRUCTION",
    "TEMPLATES",
    "Template",
    "generate",
    "main",
    "render_problem",
    "to_jsonl",
    "write_jsonl",
]

DEFAULT_OUT = Path(__file__).resolve().parent / "smoke" / "arithmetic.jsonl"
INSTRUCTION = "Give the final answer as <answer>NUMBER</answer>."
DIFFICULTIES = ("easy", "medium", "hard")

# (name, subject pronoun); a second person in a problem is always a different name.
NAMES: Tuple[Tuple[str, str], ...] = (
    ("Tom", "he"), ("Anna", "she"), ("Sam", "he"), ("Maria", "she"), ("Leo", "he"), ("Priya", "she"),
    ("Omar", "he"), ("Mei", "she"), ("Lucas", "he"), ("Zoe", "she"), ("Ravi", "he"), ("Ella", "she"),
    ("Jack", "he"), ("Nora", "she"), ("Ben", "he"), ("Aisha", "she"),
)
# Plural nouns: every count that a noun follows is >= 2 (an amount of 1 is only ever "1 of them" / "gives 1").
OBJECTS: Tuple[str, ...] = (
    "apples", "pencils", "marbles", "stickers", "cookies", "books", "balloons", "shells",
    "cards", "oranges", "stamps", "crayons", "buttons", "candies", "toy cars", "flowers",
)


@dataclass(frozen=True)
class Template:
    """One problem shape: its text, the operation(s) it asks for, and how its numbers are drawn."""

    kind: str  # add, sub, mul, add_sub, mul_add, mul_sub
    text: str  # placeholders: {name} {name2} {pro} {Pro} {obj} {a} {b} {c}


# Operation kind -> (difficulty, answer from the numbers).
KINDS: Dict[str, Tuple[str, Callable[..., int]]] = {
    "add": ("easy", lambda a, b, c: a + b),
    "sub": ("easy", lambda a, b, c: a - b),
    "mul": ("medium", lambda a, b, c: a * b),
    "add_sub": ("hard", lambda a, b, c: a + b - c),
    "mul_add": ("hard", lambda a, b, c: a * b + c),
    "mul_sub": ("hard", lambda a, b, c: a * b - c),
}

TEMPLATES: Tuple[Template, ...] = (
    Template("add", "{name} has {a} {obj} and buys {b} more. How many {obj} does {pro} have now?"),
    Template("add", "{name} picked {a} {obj} in the morning and {b} {obj} in the afternoon. "
                    "How many {obj} did {pro} pick in total?"),
    Template("add", "There are {a} {obj} in a basket. {name} puts {b} more {obj} in the basket. "
                    "How many {obj} are in the basket now?"),
    Template("add", "{name} has {a} {obj} and {name2} has {b} {obj}. How many {obj} do they have together?"),
    Template("sub", "{name} has {a} {obj} and gives {b} of them to {name2}. How many {obj} does {pro} have left?"),
    Template("sub", "There are {a} {obj} on the table. {name} takes {b} of them away. "
                    "How many {obj} are left on the table?"),
    Template("sub", "{name} had {a} {obj}. {Pro} lost {b} of them. How many {obj} does {pro} have now?"),
    Template("sub", "{name} has {a} {obj} and {name2} has {b} {obj}. How many more {obj} does {name} have "
                    "than {name2}?"),
    Template("mul", "{name} has {a} bags with {b} {obj} in each bag. How many {obj} does {pro} have in total?"),
    Template("mul", "There are {a} groups of {b} {obj}. How many {obj} are there altogether?"),
    Template("mul", "{name} buys {a} boxes of {b} {obj}. How many {obj} did {pro} buy?"),
    Template("mul", "{name} puts {b} {obj} on each of {a} shelves. How many {obj} are on the shelves?"),
    Template("add_sub", "{name} has {a} {obj}, buys {b} more, and then gives {c} to {name2}. "
                        "How many {obj} does {pro} have now?"),
    Template("add_sub", "There are {a} {obj} in a box. {name} adds {b} {obj} and then takes out {c}. "
                        "How many {obj} are in the box now?"),
    Template("mul_add", "{name} has {a} boxes with {b} {obj} in each box and {c} more {obj} on the desk. "
                        "How many {obj} does {pro} have in total?"),
    Template("mul_add", "There are {a} groups of {b} {obj} and {c} extra {obj}. How many {obj} are there "
                        "altogether?"),
    Template("mul_sub", "{name} buys {a} packs of {b} {obj} and gives {c} of them away. "
                        "How many {obj} does {pro} have left?"),
    Template("mul_sub", "{name} fills {a} jars with {b} {obj} each, then takes {c} of them out. "
                        "How many {obj} are still in the jars?"),
)


def _numbers(kind: str, rng: random.Random) -> Tuple[int, int, int]:
    """Small integers for one problem; every intermediate and final result is >= 0 (``c`` is 0 when unused)."""
    if kind == "add":
        return rng.randint(2, 20), rng.randint(2, 20), 0
    if kind == "sub":
        a = rng.randint(5, 30)
        return a, rng.randint(2, a - 1), 0
    if kind == "mul":
        return rng.randint(2, 9), rng.randint(2, 9), 0
    if kind == "add_sub":
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        return a, b, rng.randint(1, a + b - 1)
    if kind == "mul_add":
        return rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 15)
    if kind == "mul_sub":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return a, b, rng.randint(1, a * b - 1)
    raise ValueError(f"unknown problem kind {kind!r}")


def render_problem(template: Template, a: int, b: int, c: int = 0, name: str = "Tom", pronoun: str = "he",
                   name2: str = "Anna", obj: str = "apples") -> Tuple[str, int]:
    """(problem text, integer answer) of one template with the given numbers and words."""
    text = template.text.format(
        name=name, name2=name2, pro=pronoun, Pro=pronoun.capitalize(), obj=obj, a=a, b=b, c=c
    )
    return text, KINDS[template.kind][1](a, b, c)


def _row(rng: random.Random) -> Dict[str, object]:
    difficulty = rng.choice(DIFFICULTIES)
    template = rng.choice([t for t in TEMPLATES if KINDS[t.kind][0] == difficulty])
    a, b, c = _numbers(template.kind, rng)
    (name, pronoun), (name2, _) = rng.sample(NAMES, 2)
    problem, answer = render_problem(template, a, b, c, name, pronoun, name2, rng.choice(OBJECTS))
    return {
        "prompt": [{"role": "user", "content": f"{problem} {INSTRUCTION}"}],
        "answer": str(answer),
        "difficulty": difficulty,
    }


def generate(rows: int = 500, seed: int = 0) -> List[Dict[str, object]]:
    """``rows`` distinct problems, deterministic in ``seed`` (duplicates are redrawn)."""
    if rows < 0:
        raise ValueError(f"rows={rows}: must be >= 0")
    rng = random.Random(seed)
    out: List[Dict[str, object]] = []
    seen = set()
    attempts = 0
    while len(out) < rows:
        attempts += 1
        if attempts > 100 * rows + 1000:
            raise ValueError(f"rows={rows}: cannot draw that many distinct problems")
        row = _row(rng)
        key = row["prompt"][0]["content"]  # type: ignore[index]
        if key in seen:
            continue
        seen.add(key)
        out.append(row)
    return out


def to_jsonl(rows: Sequence[Dict[str, object]]) -> str:
    """The file's text: one JSON object per line, ``\\n`` line ends."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_jsonl(rows: Sequence[Dict[str, object]], path: "str | Path") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(to_jsonl(rows))
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m alignctl.data.make_arithmetic",
        description="Write arithmetic word problems (prompt messages, integer answer, difficulty) as JSONL.",
    )
    parser.add_argument("--rows", type=int, default=500, help="number of problems (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"output .jsonl file (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if args.rows < 0:
        parser.error(f"--rows={args.rows}: must be >= 0")
    path = write_jsonl(generate(args.rows, args.seed), args.out)
    print(f"wrote {args.rows} problems to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
