"""The Problem record and the task loader."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drift import DriftError
from drift.config import option


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

    def opening(self) -> list[dict[str, str]]:
        """The first user turn(s) of the conversation (without the system prompt)."""
        if self.messages:
            return [dict(m) for m in self.messages]
        text = self.question if not self.instruction else f"{self.question}\n{self.instruction}"
        return [{"role": "user", "content": text}]


@dataclass
class TaskSpec:
    """Which problems to use. Shared by rollout, eval and the pipeline."""

    tasks: str = option("mc-arith", "built-in generator (mc-arith, arith, mul), a .jsonl/.parquet file, or hf:NAME[:CONFIG][@SPLIT]")
    num_problems: int | None = option(None, "use at most this many problems (generators: how many to make)")
    task_seed: int = option(0, "seed of the built-in generators and of shuffling")
    split: str = option("all", "which part of a built-in generator's problem space: train, test or all (disjoint by problem identity)")
    checker: str | None = option(None, "override every problem's checker (math, numeric, choice, exact, module:function)")


_GSM8K = re.compile(r"####\s*(.+?)\s*$", re.S)


def gold_from_text(answer: str) -> str:
    """Normalize a gold answer given in GSM8K (`... #### 42`) or MATH (`\\boxed{..}`) style."""
    answer = str(answer).strip()
    m = _GSM8K.search(answer)
    if m:
        return m.group(1).replace(",", "").strip()
    from drift.checkers import last_boxed

    boxed = last_boxed(answer)
    return boxed if boxed is not None else answer


def _problem_from_row(row: dict[str, Any], where: str, default_id: str) -> Problem:
    if "answer" not in row or row["answer"] is None:
        raise DriftError(f"{where}: missing field 'answer'")
    question = row.get("question") or row.get("problem") or row.get("query")
    messages = row.get("messages")
    if not question and not messages:
        raise DriftError(f"{where}: needs 'question' or 'messages'")
    if messages is not None:
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise DriftError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        messages = [{"role": m["role"], "content": str(m["content"])} for m in messages if m["role"] != "system"]
        question = question or messages[-1]["content"]
    return Problem(
        id=str(row.get("id", default_id)),
        question=str(question),
        answer=gold_from_text(row["answer"]),
        checker=str(row.get("checker") or "math"),
        extract=str(row.get("extract") or "auto"),
        instruction=row.get("instruction"),
        messages=messages,
        metadata={k: v for k, v in row.items() if k not in ("id", "question", "answer", "messages", "checker", "extract", "instruction")},
    )


def _load_file(path: Path) -> list[Problem]:
    from drift.records import read_jsonl

    if path.suffix == ".parquet":
        import datasets

        rows = list(datasets.load_dataset("parquet", data_files=str(path), split="train"))
        return [_problem_from_row(r, f"{path}:row {i + 1}", f"{path.stem}-{i}") for i, r in enumerate(rows)]
    problems = [_problem_from_row(r, f"{path}:{ln}", f"{path.stem}-{ln}") for ln, r in read_jsonl(path)]
    if not problems:
        raise DriftError(f"{path}: no problems (empty file)")
    return problems


def _load_hf(spec: str) -> list[Problem]:
    """`hf:NAME[:CONFIG][@SPLIT]` — e.g. `hf:openai/gsm8k:main@test`."""
    import datasets

    body = spec[3:]
    body, _, split = body.partition("@")
    name, _, cfg = body.partition(":")
    try:
        ds = datasets.load_dataset(name, cfg or None, split=split or "test")
    except Exception as e:  # the hub raises many types; report them as one user-facing error
        raise DriftError(f"cannot load Hugging Face dataset {name!r}: {e}") from None
    return [_problem_from_row(dict(r), f"{spec}:row {i + 1}", f"{name.split('/')[-1]}-{i}") for i, r in enumerate(ds)]


def load_tasks(spec: TaskSpec) -> list[Problem]:
    """Resolve a TaskSpec to a list of problems (deterministic)."""
    from drift.tasks import generators

    name = spec.tasks
    if name in generators.GENERATORS:
        problems = generators.generate(name, spec.num_problems, spec.task_seed, spec.split)
    elif name.startswith("hf:"):
        problems = _load_hf(name)
    else:
        path = Path(name)
        if not path.is_file():
            raise DriftError(f"tasks {name!r}: not a built-in generator ({', '.join(generators.GENERATORS)}), "
                             "not an existing file, and not hf:NAME")
        problems = _load_file(path)
    if name not in generators.GENERATORS and spec.num_problems is not None:
        problems = problems[: spec.num_problems]
    if spec.checker:
        for p in problems:
            p.checker = spec.checker
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DriftError(f"tasks {name!r}: duplicate problem id {dup!r}")
    return problems


def split_problems(problems: list[Problem], n_test: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """Deterministically split problems into disjoint (train, test) by id."""
    import random

    order = sorted(problems, key=lambda p: p.id)
    random.Random(seed).shuffle(order)
    test_ids = {p.id for p in order[:n_test]}
    return [p for p in problems if p.id not in test_ids], [p for p in problems if p.id in test_ids]
