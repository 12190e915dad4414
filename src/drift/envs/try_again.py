"""The checker-judged environments: try-again, hint, and the DRIFT reference's prompt modes.

- `TryAgain`: the unary-feedback loop. The problem's checker judges the extracted answer; correct
  ends the conversation with reward 1, anything else gets reward 0 and the fixed `feedback`.
- `Hint`: the same, but a wrong number is told which way it is off ("Your answer is too high.").
- `Reference`: the prompt formats of the DRIFT reference code. "full" (its training rollouts):
  a system prompt asking for `<think>...</think><answer>...</answer>`, every user turn
  "Turn k: State: <question> ... You have N actions left", the reward of the last attempt shown
  in the next turn; "simple" (its evaluation): the same system prompt, the plain question, and
  the feedback text alone after a wrong answer.

All run in the caller's process (`in_process`): judging is a checker call, and the checker puts
its slow checks (math-verify, module:function) into the worker pool itself, a batch at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from drift import DriftError
from drift.checkers import Checker, CheckResult, get_checker
from drift.checkers.extract import to_number
from drift.env import DEFAULT_FEEDBACK, DEFAULT_SYSTEM, Step
from drift.tasks import Problem

REFERENCE_SYSTEM = ("Solve the task over one or more turns. In each turn, reason inside <think> </think> and then give "
                    "your final answer inside <answer> </answer>.")


class TryAgain:
    """The try-again loop (drift's original environment, unchanged turn for turn)."""

    in_process = True
    version = "1"

    def __init__(self, max_turns: int = 5, feedback: str = DEFAULT_FEEDBACK, system_prompt: str | None = DEFAULT_SYSTEM,
                 instruction: str | None = None, check_timeout: float = 5.0, check_workers: int | None = None,
                 oracle: bool = True):
        self.max_turns, self.feedback, self.system_prompt, self.instruction = max_turns, feedback, system_prompt, instruction
        self.oracle = oracle  # false: a right answer does not end the conversation and gets the feedback too
        self.check_timeout, self.check_workers = check_timeout, check_workers

    def problem(self, row: dict[str, Any]) -> Problem:
        p = Problem(**row)
        if self.instruction is not None:
            p.instruction = self.instruction
        return p

    def checker(self, p: Problem) -> Checker:
        return get_checker(p.checker, p.extract, self.check_timeout, self.check_workers)

    def reset(self, problem: dict[str, Any]) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + self.problem(problem).opening()

    def step(self, problem: dict[str, Any], messages: list[dict[str, str]]) -> Step:
        return self.step_batch([(problem, messages)])[0]

    def step_batch(self, items: Sequence[tuple[dict[str, Any], list[dict[str, str]]]]) -> list[Step]:
        """Judge a batch: every check that needs a worker process is submitted before any is awaited."""
        problems = [self.problem(row) for row, _ in items]
        pending = [self.checker(p).submit(messages[-1]["content"], p.answer) for p, (_, messages) in zip(problems, items)]
        return [self.judged(p, messages, check.result()) for p, (_, messages), check in zip(problems, items, pending)]

    def judged(self, p: Problem, messages: list[dict[str, str]], result: CheckResult) -> Step:
        correct = result.status == "correct"
        info = {"correct": correct, "status": result.status, "answer": result.answer, "answer_norm": result.answer_norm}
        if correct:
            return Step(reward=1.0, done=self.oracle, feedback=None if self.oracle else self.feedback, info=info)
        return Step(reward=0.0, done=False, feedback=self.hint(p, messages, result), info=info)

    def hint(self, p: Problem, messages: list[dict[str, str]], result: CheckResult) -> str:
        """The user message after a wrong answer."""
        return self.feedback

    def check_problems(self, rows: list[dict[str, Any]]) -> None:
        """Raise DriftError naming the first problem whose gold answer its checker cannot read (before any sampling).

        Otherwise every answer to it would be judged wrong without a word. The golds of each checker
        go in one batch (math-verify parses them in its worker processes at once)."""
        golds: dict[Checker, list[tuple[str, str]]] = {}
        for p in map(self.problem, rows):
            golds.setdefault(self.checker(p), []).append((p.id, p.answer))
        for checker, pairs in golds.items():
            checker.check_golds(pairs)


class Hint(TryAgain):
    """Try-again whose feedback on a numeric answer says which way it is off.

    `high` / `low`: the message for an answer above / below the gold number ("{answer}" is replaced
    by the answer); `unreadable`: for an answer without a number; any other case (a gold answer that
    is not a number, a timed-out check) gets the plain `feedback`."""

    version = "1"

    def __init__(self, high: str = "Your answer is too high.", low: str = "Your answer is too low.",
                 unreadable: str = "I could not find a number in your answer.", **common: Any):
        super().__init__(**common)
        self.high, self.low, self.unreadable = high, low, unreadable

    def hint(self, p: Problem, messages: list[dict[str, str]], result: CheckResult) -> str:
        gold = to_number(p.answer)
        if gold is None or result.status == "timeout":
            return self.feedback
        answer = to_number(result.answer) if result.answer is not None else None
        if answer is None:
            return self.unreadable
        return (self.high if answer > gold else self.low).replace("{answer}", result.answer)


class Reference(TryAgain):
    """The DRIFT reference code's prompt formats: `mode` "full" (training) or "simple" (evaluation).

    Its system message is `system` (env_args), the format prompt, in place of `system_prompt`."""

    version = "1"

    def __init__(self, mode: Literal["full", "simple"] = "full", system: str = REFERENCE_SYSTEM, **common: Any):
        if mode not in ("full", "simple"):
            raise DriftError(f"reference environment: mode must be 'full' or 'simple', got {mode!r}")
        super().__init__(**common)
        self.mode, self.system_prompt = mode, system  # its own format prompt, not the try-again default

    def reset(self, problem: dict[str, Any]) -> list[dict[str, str]]:
        opening = super().reset(problem)
        if self.mode == "full":
            opening[-1]["content"] = self.state(1, opening[-1]["content"])
        return opening

    def state(self, turn: int, text: str) -> str:
        return f"Turn {turn}: State: {text}\nYou have {self.max_turns - turn + 1} actions left."

    def hint(self, p: Problem, messages: list[dict[str, str]], result: CheckResult) -> str:
        if self.mode == "simple":
            return self.feedback
        turn = sum(m["role"] == "assistant" for m in messages) + 1
        question = p.opening()[-1]["content"]
        shown = result.answer if result.answer is not None else "(no answer found)"
        return self.state(turn, f"{question}\nYour last answer: {shown}. Reward: 0. {self.feedback}")
