"""The try-again environment: the rules of the unary-feedback loop.

Up to `max_turns` assistant turns. After each, the checker judges the extracted answer:
correct ends the episode (success at that turn); wrong or unparseable appends the feedback
message as a user turn and the next turn starts. The environment does not generate text —
the rollout engine owns the loop and asks the environment what happens after each response.
"""

from __future__ import annotations

from dataclasses import dataclass

from drift import DriftError
from drift.checkers import Checker, get_checker
from drift.config import option
from drift.records import Trajectory, Turn
from drift.tasks import Problem

DEFAULT_FEEDBACK = "Incorrect. Please think again."
DEFAULT_SYSTEM = "You're a helpful assistant."


@dataclass
class EnvConfig:
    max_turns: int = option(5, "maximum assistant turns per conversation")
    feedback: str = option(DEFAULT_FEEDBACK, "user message after a wrong or unparseable answer")
    system_prompt: str | None = option(DEFAULT_SYSTEM, "system prompt (none: no system message)")
    instruction: str | None = option(None, "answer-format instruction appended to every question (default: the task's own)")
    check_timeout: float = option(5.0, "seconds allowed to check one answer (math-verify runs in worker processes)")

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise DriftError(f"max_turns must be >= 1, got {self.max_turns}")


class Episode:
    """The state of one conversation; `step(response)` applies the rules to one response."""

    def __init__(self, problem: Problem, sample_idx: int, cfg: EnvConfig, checker: Checker | None = None):
        self.problem = problem
        self.cfg = cfg
        self.checker = checker or get_checker(problem.checker, problem.extract, cfg.check_timeout)
        if cfg.instruction is not None:
            problem = Problem(**{**problem.__dict__, "instruction": cfg.instruction})
        system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
        self.trajectory = Trajectory(prompt_id=problem.id, sample_idx=sample_idx,
                                     messages=system + problem.opening(), turns=[], gold=problem.answer)

    @property
    def messages(self) -> list[dict[str, str]]:
        return self.trajectory.messages

    @property
    def done(self) -> bool:
        t = self.trajectory
        return t.success_turn is not None or len(t.turns) >= self.cfg.max_turns

    def step(self, response: str, tokens: int = 0, finish_reason: str = "stop") -> Turn:
        """Record `response`, judge it, and append the feedback message if the episode goes on."""
        if self.done:
            raise RuntimeError("step() on a finished episode")
        result = self.checker.check(response, self.problem.answer)
        turn = Turn(response=response, answer=result.answer, answer_norm=result.answer_norm,
                    status=result.status, tokens=tokens, finish_reason=finish_reason)
        t = self.trajectory
        t.turns.append(turn)
        t.messages.append({"role": "assistant", "content": response})
        if turn.correct:
            t.success_turn = len(t.turns)
        elif not self.done:
            t.messages.append({"role": "user", "content": self.cfg.feedback})
        return turn
