"""Built-in task generators, deterministic by seed.

Each generator enumerates a finite problem space of *facts* (e.g. the pair {a, b}); the
train/test split is a fixed hash of the fact, so train and test are disjoint by problem
identity (a + b and b + a are the same fact), whatever seeds are used to draw from them.

- `mc-arith`: two-digit addition posed as four-option multiple choice; answer = a letter.
  Distractors sit near the sum (off by 1, 2 or 10).
- `arith`: two-digit addition with a free-form integer answer.
- `mul`: multiplication with both factors in 2..12 (121 ordered facts, 66 unordered);
  free-form integer answer. The base model knows some facts, so turns 2+ matter.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from drift import DriftError
from drift.tasks.problem import Problem, split_of

LETTERS = "ABCD"
NUMBER_INSTRUCTION = "Answer with just the number."
LETTER_INSTRUCTION = "Give the letter of the correct option inside <answer></answer> tags."


def _pairs(lo: int, hi: int) -> list[tuple[int, int]]:
    return [(a, b) for a in range(lo, hi + 1) for b in range(lo, hi + 1)]


def _fact(a: int, b: int, op: str) -> str:
    x, y = sorted((a, b))
    return f"{x}{op}{y}"


def _mc_arith(a: int, b: int, rng: random.Random) -> Problem:
    total = a + b
    offsets = rng.sample([-10, -2, -1, 1, 2, 10], 3)
    options = [total] + [total + d for d in offsets]
    rng.shuffle(options)
    letter = LETTERS[options.index(total)]
    lines = [f"What is {a} + {b}?"] + [f"{LETTERS[i]}. {v}" for i, v in enumerate(options)]
    return Problem(id=f"mc-arith-{a}+{b}", question="\n".join(lines), answer=letter, checker="choice",
                   extract="letter", instruction=LETTER_INSTRUCTION,
                   metadata={"a": a, "b": b, "options": options, "fact": _fact(a, b, "+")})


def _arith(a: int, b: int, rng: random.Random) -> Problem:
    return Problem(id=f"arith-{a}+{b}", question=f"What is {a} + {b}?", answer=str(a + b), checker="numeric",
                   extract="number", instruction=NUMBER_INSTRUCTION, metadata={"a": a, "b": b, "fact": _fact(a, b, "+")})


def _mul(a: int, b: int, rng: random.Random) -> Problem:
    return Problem(id=f"mul-{a}x{b}", question=f"What is {a} x {b}?", answer=str(a * b), checker="numeric",
                   extract="number", instruction=NUMBER_INSTRUCTION, metadata={"a": a, "b": b, "fact": _fact(a, b, "x")})


GENERATORS: dict[str, tuple[Callable[[int, int, random.Random], Problem], list[tuple[int, int]], str]] = {
    "mc-arith": (_mc_arith, _pairs(10, 99), "+"),
    "arith": (_arith, _pairs(10, 99), "+"),
    "mul": (_mul, _pairs(2, 12), "x"),
}


def generate(name: str, num: int | None, seed: int, split: str) -> list[Problem]:
    """`num` problems of generator `name` from `split` (train | test | all), drawn by `seed`."""
    make, space, op = GENERATORS[name]
    pool = [(a, b) for a, b in space if split == "all" or split_of(_fact(a, b, op)) == split]
    rng = random.Random(f"{name}:{seed}")
    if num is None:
        num = len(pool)
    if num > len(pool):
        raise DriftError(f"{name}: asked for {num} problems but the {split} split has only {len(pool)}")
    chosen = rng.sample(pool, num)
    return [make(a, b, random.Random(f"{name}:{a}:{b}")) for a, b in chosen]
