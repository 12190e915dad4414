"""An installed `verifiers` taskset as a drift environment: `env = "verifiers:NAME"`, `tasks = "verifiers:NAME"`.

verifiers 0.4 (its `verifiers.v1` stack) splits an environment into a taskset (tasks: a prompt, a
system prompt, task fields) whose tasks score a finished conversation with their `@vf.reward`
functions and plugged judges, and agents/harnesses that drive the model themselves. drift owns the
loop and the model, so it takes the taskset: `reset` opens with the task's system prompt and prompt,
`step` scores the conversation so far with `Task.score` (the weighted sum of the task's rewards is
the turn's reward; success is reward >= `success_at`), and a conversation that has not succeeded
gets `feedback`. verifiers 0.4 has no environment reply for a plain taskset (its multi-turn
replies come from simulated-user agents, which need a model client of their own), so the
feedback is drift's text. Tool calls, containers and harness rewards are not run.

`tasks = "verifiers:NAME"` loads the taskset's tasks as drift problems (`verifiers_problems`); the
problem id is the task's `id` field, else its position.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from typing import Any

from drift import DriftError
from drift.env import DEFAULT_FEEDBACK, Step
from drift.tasks import Problem

try:
    import verifiers.v1 as vf
    from verifiers.v1 import types as vf_types
    from verifiers.v1.graph import MessageNode
    from verifiers.v1.trace import AgentInfo, Trace, TraceTask
    from verifiers.v1.utils.generic import concrete_type
    from verifiers.v1.utils.loaders import taskset_class
except ImportError as e:
    raise DriftError(f"the verifiers environments need the verifiers package ({e}): "
                     "pip install 'drift-rl[verifiers]'") from None

_ROLES = {"system": vf_types.SystemMessage, "user": vf_types.UserMessage, "assistant": vf_types.AssistantMessage,
          "tool": vf_types.ToolMessage}


def load_taskset(name: str, taskset_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """The tasks of taskset `name`, by drift problem id."""
    try:
        cls = taskset_class(name)
        config = (concrete_type(cls, vf.TasksetConfig) or vf.TasksetConfig).model_validate(
            {**(taskset_args or {}), "id": name})
        tasks = list(cls(config))
    except DriftError:
        raise
    except Exception as e:
        raise DriftError(f"verifiers taskset {name!r}: {type(e).__name__}: {' '.join(str(e).split())}") from None
    if not tasks:
        raise DriftError(f"verifiers taskset {name!r} has no tasks")
    return {task.data.id or f"{name}-{task.data.idx}": task for task in tasks}


def verifiers_problems(name: str) -> list[Problem]:
    """The taskset's tasks as drift problems (for `tasks = "verifiers:NAME"`)."""
    return [Problem(id=pid, question=task.data.prompt_text, answer=str(getattr(task.data, "answer", "") or ""),
                    checker="exact", extract="full", metadata={"verifiers_task": pid})
            for pid, task in load_taskset(name).items()]


class Verifiers:
    """A verifiers taskset judged by its tasks' own rewards (see the module docstring)."""

    def __init__(self, name: str, feedback: str = DEFAULT_FEEDBACK, success_at: float = 1.0,
                 taskset_args: dict[str, Any] | None = None, in_process: bool = False):
        self.name, self.feedback, self.success_at, self.in_process = name, feedback, success_at, in_process
        self.tasks = load_taskset(name, taskset_args)
        module = name.replace("-", "_").lower()
        self.version = f"verifiers {vf_version()}, {module} {_version(module) or 'unversioned'}"

    def task(self, problem: dict[str, Any]) -> Any:
        pid = (problem.get("metadata") or {}).get("verifiers_task", problem.get("id"))
        if pid not in self.tasks:
            raise DriftError(f"verifiers taskset {self.name!r} has no task {pid!r} (load the problems with "
                             f"tasks = \"verifiers:{self.name}\")")
        return self.tasks[pid]

    def reset(self, problem: dict[str, Any]) -> list[dict[str, str]]:
        data = self.task(problem).data
        opening = [{"role": "system", "content": data.system_prompt}] if data.system_prompt else []
        if isinstance(data.prompt, str):
            return opening + [{"role": "user", "content": data.prompt}]
        return opening + [{"role": m.role, "content": vf_types.content_text(m.content)} for m in data.prompt or []]

    def step(self, problem: dict[str, Any], messages: list[dict[str, str]]) -> Step:
        task = self.task(problem)
        nodes = [MessageNode(parent=i - 1 if i else None, message=_ROLES[m["role"]](content=m["content"]),
                             sampled=m["role"] == "assistant") for i, m in enumerate(messages)]
        trace = Trace(task=TraceTask(type=type(task).__name__, data=task.data, key=task.key),
                      agent=AgentInfo(config=vf.AgentConfig()), nodes=nodes)
        asyncio.run(task.score(trace))
        reward = float(trace.reward)
        correct = reward >= self.success_at
        scores = {k: (r.score if r is not None else None) for k, r in trace.rewards.items()}
        return Step(reward, correct, None if correct else self.feedback, {"correct": correct, "rewards": scores})


def vf_version() -> str:
    return _version("verifiers") or "unknown"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
