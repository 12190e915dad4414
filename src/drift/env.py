"""Environments: the plug-in that opens each conversation and judges each answer.

An environment is what `factory(**env_args)` returns for `env = "module:factory"` (or a built-in
name, `drift.envs.BUILTIN`). It has two methods:

    reset(problem: dict) -> list[dict]                 the opening messages (system, user, ...)
    step(problem: dict, messages: list[dict]) -> Step  judge the conversation whose last message
                                                       is the model's answer

`problem` is one task row (`Problem` as a dict: id, question, answer, messages, metadata, ...).
Optional attributes: `version` (a string; part of the stage settings, so a changed environment
never reuses old outputs), `in_process = True` (reset/step are cheap and run in the caller's
process; otherwise every call runs in the checker worker pool under `check_timeout`), and
`step_batch(items)` for an in-process environment that judges a batch at once.

The rollout engine owns the loop: up to `max_turns` assistant turns; after each, `Step.done`
or success ends the conversation, else `Step.feedback` is appended (a string: one user message;
a list: those messages) and the next turn starts. Success is `info["correct"]` where the
environment gives it, else `reward > 0`; the turn's record takes `info`'s "status", "answer" and
"answer_norm" as its own fields and keeps the rest of `info`. Loading, calling and checking an
environment (`drift.envs.runner`) turns every way it can go wrong into one DriftError line
naming the environment, the problem and the turn.

Stopping at the first correct answer makes the feedback an oracle's (it is only ever said after a
wrong answer); with `oracle = false` every conversation runs `max_turns` turns and the built-in
environments give their feedback after right answers too (SCoRe's second attempt). A problem
with a `planted` answer starts after it: turn 1 is that answer, judged by the environment like
any other (the trajectory's metadata says `planted`), followed by its feedback.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from drift import DriftError
from drift.checkers.extract import normalize_answer, strip_think
from drift.config import option
from drift.records import STATUSES, Trajectory, Turn
from drift.tasks import Problem

DEFAULT_FEEDBACK = "Incorrect. Please think again."
DEFAULT_SYSTEM = "You're a helpful assistant."
NO_ORACLE_FEEDBACK = "Please check your answer and answer again."
RESERVED_INFO = ("correct", "status", "answer", "answer_norm")  # info keys that become the turn's own fields


@dataclass
class Step:
    """What the environment makes of one answer."""

    reward: float  # this turn's reward
    done: bool  # the conversation ends here
    feedback: str | list[dict[str, str]] | None = None  # the next user or tool message(s)
    info: dict[str, Any] = field(default_factory=dict)  # recorded with the turn (JSON-ready)

# The keys that make the environment, in the order the report shows them: which environment, EnvConfig's rules and
# the checker (a task key of the rollout and eval configs). An evaluation in a `drift run`
# inherits them, and how the checker runs (check_workers), from the rollout (`evaluate.inherit_environment`).
ENVIRONMENT_KEYS = ("env", "env_args", "env_failures", "system_prompt", "instruction", "feedback", "checker",
                    "check_timeout", "max_turns", "oracle")


@dataclass
class EnvConfig:
    env: str = option("try-again", "environment: a built-in (try-again, hint, code, reference-full, reference-simple), "
                      "module:factory, or verifiers:NAME (an installed verifiers environment)")
    env_args: dict = option({}, "keyword arguments of the environment factory (CLI: --env-arg key=value, repeatable)",
                            flag="--env-arg")
    env_failures: Literal["stop", "record"] = option(
        "stop", "an environment's step raising or hanging: stop the run with an error naming the problem and turn, "
        "or record that conversation as failed (reward 0, info.env_error) and go on")
    max_turns: int = option(5, "maximum assistant turns per conversation")
    feedback: str = option(DEFAULT_FEEDBACK, "user message after a wrong or unparseable answer (try-again, reference)")
    system_prompt: str | None = option(DEFAULT_SYSTEM, "system prompt (none: no system message; built-in environments)")
    oracle: bool = option(True, "stop at the first correct answer, so feedback follows wrong answers only; "
                          "false: every conversation runs max_turns turns, feedback after every answer",
                          result="changed")
    instruction: str | None = option(None, "answer-format instruction appended to every question (default: the task's own)")
    check_timeout: float = option(5.0, "seconds allowed to check one answer or run one environment call in a worker "
                                  "process (math-verify, module:function checkers, pooled environments)")
    check_workers: int | None = option(None, "worker processes for math-verify, module:function checkers and pooled "
                                             "environments (none: min(4, CPU count))", result=False)

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise DriftError(f"max_turns must be >= 1, got {self.max_turns}")
        if self.check_workers is not None and self.check_workers < 1:
            raise DriftError(f"check_workers must be >= 1, got {self.check_workers}")
        if not self.check_timeout > 0:
            raise DriftError(f"check_timeout must be > 0 seconds, got {self.check_timeout}")


def problem_row(problem: Problem) -> dict[str, Any]:
    """The task row an environment sees: the problem's fields as a plain dict (a copy)."""
    return json.loads(json.dumps(problem.__dict__))


class Episode:
    """The state of one conversation: its messages and turns, built from the environment's answers."""

    def __init__(self, problem: Problem, sample_idx: int, opening: list[dict[str, str]], max_turns: int,
                 oracle: bool = True):
        self.problem, self.row, self.max_turns, self.oracle = problem, problem_row(problem), max_turns, oracle
        self.ended = False  # the environment said done
        self.trajectory = Trajectory(prompt_id=problem.id, sample_idx=sample_idx,
                                     messages=[dict(m) for m in opening], turns=[], gold=problem.answer)
        if problem.planted is not None:
            self.trajectory.metadata["planted"] = True

    @property
    def messages(self) -> list[dict[str, str]]:
        return self.trajectory.messages

    @property
    def done(self) -> bool:
        t = self.trajectory
        return self.ended or (self.oracle and t.success_turn is not None) or len(t.turns) >= self.max_turns

    def answer(self, response: str) -> list[dict[str, str]]:
        """Append the model's answer; return the conversation the environment judges."""
        if self.done:
            raise RuntimeError("answer() on a finished episode")
        self.messages.append({"role": "assistant", "content": response})
        return self.messages

    def apply(self, step: Step, tokens: int = 0, finish_reason: str = "stop") -> Turn:
        """Record the judged answer (the last message) as a turn; append the feedback if the episode goes on."""
        t = self.trajectory
        response = t.messages[-1]["content"]
        turn = make_turn(response, step, tokens, finish_reason)
        t.turns.append(turn)
        if turn.correct and t.success_turn is None:
            t.success_turn = len(t.turns)
        self.ended = step.done
        if not self.done and step.feedback is not None:
            t.messages.extend(feedback_messages(step.feedback))
        return turn


def make_turn(response: str, step: Step, tokens: int, finish_reason: str) -> Turn:
    """The turn record of a judged answer. Its reward is stored only where it is not the status's 0/1,
    so that an environment with 0/1 rewards writes exactly the records the try-again loop always wrote."""
    info = step.info
    success = bool(info["correct"]) if "correct" in info else step.reward > 0
    status = "correct" if success else info.get("status", "wrong")
    answer = info["answer"] if "answer" in info else strip_think(response).strip() or None
    norm = info.get("answer_norm") or (normalize_answer(answer) if answer is not None else None)
    rest = {k: v for k, v in info.items() if k not in RESERVED_INFO}
    reward = None if step.reward == float(success) else float(step.reward)
    return Turn(response=response, answer=answer, answer_norm=norm, status=status, tokens=tokens,
                finish_reason=finish_reason, reward=reward, info=rest)


def feedback_messages(feedback: str | list[dict[str, str]]) -> list[dict[str, str]]:
    if isinstance(feedback, str):
        return [{"role": "user", "content": feedback}]
    return [dict(m) for m in feedback]


def step_problem(step: Any) -> str | None:
    """Why `step` is not a valid Step (None: it is)."""
    if not isinstance(step, Step):
        return f"returned {type(step).__name__}, not drift.env.Step"
    if isinstance(step.reward, bool) or not isinstance(step.reward, (int, float)) or not math.isfinite(step.reward):
        return f"returned a Step whose reward is {step.reward!r}, not a finite number"
    if not isinstance(step.done, bool):
        return f"returned a Step whose done is {step.done!r}, not a bool"
    if step.feedback is not None and not isinstance(step.feedback, str) and messages_problem(step.feedback):
        return f"returned a Step whose feedback {messages_problem(step.feedback)}"
    if not isinstance(step.info, dict):
        return f"returned a Step whose info is {type(step.info).__name__}, not a dict"
    status = step.info.get("status", "wrong")
    success = bool(step.info["correct"]) if "correct" in step.info else step.reward > 0
    if status == "correct" and not success:
        return "returned info.status 'correct' for an answer that is not a success (info.correct false or reward <= 0)"
    if status not in STATUSES:
        return f"returned info.status {status!r} (valid: {', '.join(STATUSES)})"
    answer = step.info.get("answer")
    if answer is not None and not isinstance(answer, str):
        return f"returned info.answer {answer!r}, not a string"
    try:
        json.dumps(step.info)
    except (TypeError, ValueError) as e:
        return f"returned an info dict that is not JSON-ready ({e})"
    return None


def messages_problem(messages: Any) -> str | None:
    """Why `messages` is not a list of {role, content} string messages (None: it is)."""
    if not isinstance(messages, list):
        return f"is {type(messages).__name__}, not a list of {{role, content}} messages"
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            return f"holds {m!r}, not a {{role, content}} message with string values"
    return None
