"""The Problem record, the TaskSpec that selects problems, and the train/test split rule."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from drift.config import option

SPLITS = ("train", "test", "all")


@dataclass
class Problem:
    """One task instance. `messages` (if given) are the opening turns without the system prompt."""

    id: str
    question: str
    answer: str  # gold answer as text
    checker: str = "math"  # math | numeric | choice | exact | module:function
    extract: str = "auto"  # answer extraction: auto | answer_tag | boxed | number | letter | last_line | full
    instruction: str | None = None  # answer-format instruction appended to the question
    messages: list[dict[str, str]] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    planted: str | None = None  # a first answer given for the model (the planted-answer probe): it answers after it

    def opening(self) -> list[dict[str, str]]:
        """The first user turn(s) of the conversation (without the system prompt)."""
        if self.messages:
            return [dict(m) for m in self.messages]
        text = self.question if not self.instruction else f"{self.question}\n{self.instruction}"
        return [{"role": "user", "content": text}]


@dataclass
class TaskSpec:
    """Which problems to use. Shared by rollout, eval and the pipeline."""

    tasks: str = option("mc-arith", "built-in generator (mc-arith, arith, mul, code), a .jsonl/.parquet file, "
                        "hf:NAME[:CONFIG][@SPLIT], or verifiers:NAME (an installed verifiers taskset)")
    num_problems: int | None = option(None, "use at most this many problems (generators: how many to make)")
    task_seed: int = option(0, "seed of the built-in generators and of shuffling")
    split: str = option("all", "train, test or all: a fixed half of the problems by a hash of their identity "
                        "(generators: the fact; files and hub datasets: the id), disjoint whatever the seed")
    checker: str | None = option(None, "override every problem's checker (math, numeric, choice, exact, module:function)")


def split_of(key: str) -> str:
    """The split a problem identity falls in: a fixed, seed-independent half each for train and test.

    The same rule for every source, so a test set stays held out wherever the problems come from.
    """
    return "test" if hashlib.sha256(key.encode()).digest()[0] % 2 else "train"
