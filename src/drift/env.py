"""The try-again environment: the rules of the unary-feedback loop.

Up to `max_turns` assistant turns. After each, the checker judges the extracted answer:
correct ends the episode (success at that turn); wrong, unparseable or timeout appends the
feedback message as a user turn and the next turn starts. Stopping at the first correct answer
makes the feedback an oracle's (it is only ever said after a wrong answer); with `oracle = false`
every episode runs `max_turns` turns and the feedback follows right answers too (SCoRe's
second attempt). A problem with a `planted` answer starts after it: turn 1 is that answer,
judged like any other (the episode's metadata says `planted`), followed by its feedback. The environment does not generate
text — the rollout engine owns the loop and asks the environment what happens after each
response: `check_responses` judges the responses of one generation step together (their
worker-bound checks run at once), and `Episode.step` applies the rules to each.
`check_golds` refuses, before any sampling, a problem whose gold answer its checker cannot read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from drift import DriftError
from drift.checkers import Checker, CheckResult, get_checker
from drift.config import option
from drift.records import Trajectory, Turn
from drift.tasks import Problem

DEFAULT_FEEDBACK = "Incorrect. Please think again."
DEFAULT_SYSTEM = "You're a helpful assistant."
NO_ORACLE_FEEDBACK = "Please check your answer and answer again."
# The keys that make the environment, in the order the report shows them: EnvConfig's rules and
# the checker (a task key of the rollout and eval configs). An evaluation in a `drift run`
# inherits them, and how the checker runs (check_workers), from the rollout (`evaluate.inherit_environment`).
ENVIRONMENT_KEYS = ("system_prompt", "instruction", "feedback", "checker", "check_timeout", "max_turns", "oracle")


@dataclass
class EnvConfig:
    max_turns: int = option(5, "maximum assistant turns per conversation")
    feedback: str = option(DEFAULT_FEEDBACK, "user message after a wrong or unparseable answer")
    oracle: bool = option(True, "stop at the first correct answer, so feedback follows wrong answers only; "
                          "false: every conversation runs max_turns turns, feedback after every answer",
                          result="changed")
    system_prompt: str | None = option(DEFAULT_SYSTEM, "system prompt (none: no system message)")
    instruction: str | None = option(None, "answer-format instruction appended to every question (default: the task's own)")
    check_timeout: float = option(5.0, "seconds allowed to check one answer (math-verify runs in worker processes)")
    check_workers: int | None = option(None, "worker processes for math-verify and module:function checkers "
                                             "(none: min(4, CPU count))", result=False)

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise DriftError(f"max_turns must be >= 1, got {self.max_turns}")
        if self.check_workers is not None and self.check_workers < 1:
            raise DriftError(f"check_workers must be >= 1, got {self.check_workers}")


def checker_for(problem: Problem, cfg: EnvConfig) -> Checker:
    return get_checker(problem.checker, problem.extract, cfg.check_timeout, cfg.check_workers)


class Episode:
    """The state of one conversation; `step(response)` applies the rules to one response."""

    def __init__(self, problem: Problem, sample_idx: int, cfg: EnvConfig, checker: Checker | None = None):
        self.problem = problem
        self.cfg = cfg
        self.checker = checker or checker_for(problem, cfg)
        if cfg.instruction is not None:
            problem = Problem(**{**problem.__dict__, "instruction": cfg.instruction})
        system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
        self.trajectory = Trajectory(prompt_id=problem.id, sample_idx=sample_idx,
                                     messages=system + problem.opening(), turns=[], gold=problem.answer)
        if problem.planted is not None:
            self.trajectory.metadata["planted"] = True
            self.step(problem.planted)
            if self.done:
                raise DriftError(f"problem {problem.id}: its planted answer ends the conversation at once "
                                 "(it is correct, or max_turns is 1): nothing is left to answer")

    @property
    def messages(self) -> list[dict[str, str]]:
        return self.trajectory.messages

    @property
    def done(self) -> bool:
        t = self.trajectory
        return (self.cfg.oracle and t.success_turn is not None) or len(t.turns) >= self.cfg.max_turns

    def step(self, response: str, tokens: int = 0, finish_reason: str = "stop",
             result: CheckResult | None = None) -> Turn:
        """Record `response`, judge it (unless `result`, its check, is given: see `check_responses`),
        and append the feedback message if the episode goes on."""
        if self.done:
            raise RuntimeError("step() on a finished episode")
        if result is None:
            result = self.checker.check(response, self.problem.answer)
        turn = Turn(response=response, answer=result.answer, answer_norm=result.answer_norm,
                    status=result.status, tokens=tokens, finish_reason=finish_reason)
        t = self.trajectory
        t.turns.append(turn)
        t.messages.append({"role": "assistant", "content": response})
        if turn.correct and t.success_turn is None:
            t.success_turn = len(t.turns)
        if not self.done:
            t.messages.append({"role": "user", "content": self.cfg.feedback})
        return turn


def check_golds(problems: Sequence[Problem], cfg: EnvConfig) -> None:
    """Raise DriftError naming the first problem whose gold answer its checker cannot read.

    Otherwise every answer to that problem would be judged wrong without a word. The golds of
    each checker go in one batch (math-verify parses them in its worker processes at once).
    """
    golds: dict[Checker, list[tuple[str, str]]] = {}
    for p in problems:
        golds.setdefault(checker_for(p, cfg), []).append((p.id, p.answer))
    for checker, pairs in golds.items():
        checker.check_golds(pairs)


def check_responses(episodes: Sequence[Episode], responses: Sequence[str]) -> list[CheckResult]:
    """The check of each episode's response; every check that needs a worker process runs at once."""
    pending = [ep.checker.submit(response, ep.problem.answer) for ep, response in zip(episodes, responses)]
    return [p.result() for p in pending]
