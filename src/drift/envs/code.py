"""The code environment: write a Python function; its unit tests, run in a sandbox, judge it.

Task rows carry `metadata.entry_point` and `metadata.tests` (the built-in `code` task set, or a
user's JSONL of description / entry_point / tests: `drift.tasks.code`). The opening is the
description and an instruction to answer with one ```python block. Each answer's last code block
(else the whole answer, if it defines the function) runs in `drift.envs.sandbox` with the tests;
all passing is success (reward 1, the conversation ends); otherwise the feedback is the first
failing test's message (or why the code did not load or finish) and the reward 0, or the share
of tests passed with `partial_credit`. Judging runs in the worker pool (this environment is not
`in_process`), so the sandboxes of a batch run side by side.
"""

from __future__ import annotations

import re
import time
from typing import Any

from drift import DriftError
from drift.env import DEFAULT_FEEDBACK, DEFAULT_SYSTEM, Step
from drift.envs.sandbox import Limits, run_tests
from drift.tasks import Problem

INSTRUCTION = "Answer with the complete function in one ```python code block."
_BLOCK = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)


def extract_code(response: str, entry_point: str) -> str | None:
    """The last fenced code block of `response` (an unclosed last one counts), else the whole response if it
    defines `entry_point`; None if neither."""
    text = re.sub(r"<think>.*?</think>", "", response, flags=re.S)
    blocks = [b for b in _BLOCK.findall(text) if b.strip()]
    if blocks:
        return blocks[-1]
    return text if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", text, re.M) else None


class Code:
    """Unit-test-judged Python functions (see the module docstring)."""

    version = "1"

    def __init__(self, max_turns: int = 5, feedback: str = DEFAULT_FEEDBACK, system_prompt: str | None = DEFAULT_SYSTEM,
                 instruction: str | None = None, check_timeout: float = 5.0, check_workers: int | None = None,
                 time_limit: float = 3.0, memory_mb: int = 512, partial_credit: bool = False, oracle: bool = True):
        if not oracle:
            raise DriftError("the code environment ends a conversation at a passing answer: oracle = false is not supported")
        if not 0 < time_limit < check_timeout:
            raise DriftError(f"code environment: time_limit ({time_limit:g} s) must be above 0 and below check_timeout "
                             f"({check_timeout:g} s), which bounds the whole step")
        if memory_mb < 64:
            raise DriftError(f"code environment: memory_mb must be >= 64, got {memory_mb}")
        self.feedback, self.system_prompt = feedback, system_prompt
        self.instruction = instruction or INSTRUCTION
        self.limits, self.partial_credit = Limits(seconds=time_limit, memory_mb=memory_mb), partial_credit

    def reset(self, problem: dict[str, Any]) -> list[dict[str, str]]:
        _task(problem)  # a row that is not a code task fails here, before any sampling
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + Problem(**{**problem, "instruction": self.instruction}).opening()

    def step(self, problem: dict[str, Any], messages: list[dict[str, str]]) -> Step:
        entry_point, tests = _task(problem)
        code = extract_code(messages[-1]["content"], entry_point)
        if code is None:
            return Step(0.0, False, f"I could not find a Python code block in your answer. {self.instruction}",
                        {"correct": False, "status": "unparseable", "answer": None})
        start = time.perf_counter()
        verdict = run_tests(code, entry_point, tests, self.limits)
        judge_ms = round(1000 * (time.perf_counter() - start), 1)
        correct = verdict.failure is None
        reward = verdict.passed / len(tests) if self.partial_credit else float(correct)
        info = {"correct": correct, "answer": code.strip(), "passed": verdict.passed, "tests": len(tests),
                "timed_out": verdict.timed_out, "judge_ms": judge_ms}  # code that runs too long is wrong, not unjudged
        feedback = None if correct else f"{verdict.failure}\n{self.feedback}"
        return Step(reward, correct, feedback, info)


def _task(problem: dict[str, Any]) -> tuple[str, list[str]]:
    meta = problem.get("metadata") or {}
    entry_point, tests = meta.get("entry_point"), meta.get("tests")
    if not isinstance(entry_point, str) or not entry_point.isidentifier():
        raise DriftError(f"problem {problem.get('id')!r} is not a code task: it needs an entry_point (a function name)")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        raise DriftError(f"problem {problem.get('id')!r} is not a code task: it needs tests (a list of Python statements)")
    return entry_point, tests
