"""env = "verifiers:NAME": a small verifiers taskset package written here, loaded as tasks and as the
environment, in the caller's process and in the worker pool (needs the optional verifiers extra)."""

from __future__ import annotations

import textwrap

import pytest

pytest.importorskip("verifiers.v1")

from drift.env import EnvConfig, Episode  # noqa: E402
from drift.envs.runner import EnvRunner  # noqa: E402
from drift.tasks import TaskSpec, load_tasks  # noqa: E402
from drift import DriftError  # noqa: E402

PACKAGE = '''
import verifiers.v1 as vf


class AddData(vf.TaskData):
    answer: str


class AddTask(vf.Task[AddData, vf.State, vf.TaskConfig]):
    @vf.reward
    async def exact(self, task, trace) -> float:
        return float(trace.last_reply == task.answer)

    @vf.reward(weight=0.0)
    async def short(self, trace) -> float:
        return float(len(trace.last_reply) < 5)


class AddTaskset(vf.Taskset[AddTask, vf.TasksetConfig]):
    def load(self):
        for a, b in [(2, 2), (3, 4)]:
            yield AddTask(AddData(id=f"add-{a}-{b}", prompt=f"{a}+{b}?", system_prompt="Reply with the number.",
                                  answer=str(a + b)), self.config.task)


__all__ = ["AddTaskset"]
'''


@pytest.fixture
def taskset(tmp_path, monkeypatch):
    (tmp_path / "drift_test_adds").mkdir()
    (tmp_path / "drift_test_adds" / "__init__.py").write_text(textwrap.dedent(PACKAGE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "drift_test_adds"


@pytest.mark.parametrize("in_process", [True, False])
def test_a_verifiers_taskset_as_tasks_and_environment(taskset, in_process):
    problems = load_tasks(TaskSpec(tasks=f"verifiers:{taskset}"))
    assert [(p.id, p.question, p.answer) for p in problems] == [("add-2-2", "2+2?", "4"), ("add-3-4", "3+4?", "7")]
    # a worker count of its own: a pool started now, whose spawned workers see the package's path
    cfg = EnvConfig(env=f"verifiers:{taskset}", env_args={"in_process": in_process}, max_turns=3, check_workers=3,
                    check_timeout=60)
    runner = EnvRunner(cfg)
    assert runner.pooled is not in_process and runner.env.version.startswith("verifiers 0.4")
    p = problems[1]
    ep = Episode(p, 0, runner.resets([p])[0], cfg.max_turns)
    assert ep.messages == [{"role": "system", "content": "Reply with the number."}, {"role": "user", "content": "3+4?"}]
    for answer in ["8", "7"]:
        ep.answer(answer)
        ep.apply(runner.steps([ep])[0])
    t = ep.trajectory
    assert t.success_turn == 2 and ep.messages[2:] == [{"role": "assistant", "content": "8"},
                                                       {"role": "user", "content": "Incorrect. Please think again."},
                                                       {"role": "assistant", "content": "7"}]
    assert t.turns[0].info == {"rewards": {"exact": 0.0, "short": 1.0}} and t.turns[0].reward is None


def test_unknown_verifiers_taskset():
    with pytest.raises(DriftError, match=r"^environment verifiers:no_such_taskset_xyz: verifiers taskset "
                                         r"'no_such_taskset_xyz': ModuleNotFoundError: taskset 'no_such_taskset_xyz' not found"):
        EnvRunner(EnvConfig(env="verifiers:no_such_taskset_xyz"))
