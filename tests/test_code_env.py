"""The code environment: the sandbox's limits, code extraction, the task set and its JSONL format, judging."""

from __future__ import annotations

import json
import random

import pytest

from drift import DriftError
from drift.env import EnvConfig, Episode
from drift.envs.code import extract_code
from drift.envs.runner import EnvRunner
from drift.envs.sandbox import Limits, isolation, run_tests
from drift.tasks import Problem, TaskSpec, load_tasks

INC = "def f(x):\n    return x + 1\n"


def test_passing_and_failing_tests_report_the_first_failure():
    v = run_tests(INC, "f", ["assert f(1) == 2", "assert f(2) == 3"])
    assert (v.passed, v.total, v.failure, v.timed_out) == (2, 2, None, False)
    v = run_tests(INC, "f", ["assert f(1) == 2", "assert f(2) == 4", "assert f(3) == 9"])
    assert (v.passed, v.failure) == (1, "Test failed: assert f(2) == 4 (your function returned 3)")
    v = run_tests("def g(x):\n    return x\n", "f", ["assert f(1) == 1"])
    assert v.failure == "Your code does not define a function named f."
    v = run_tests("def f(x)\n    return x\n", "f", ["assert f(1) == 1"])
    assert v.failure.startswith("Loading your code raised SyntaxError")
    v = run_tests("def f(x):\n    return 1 / x\n", "f", ["assert f(0) == 1"])
    assert v.failure == "Test failed: assert f(0) == 1 raised ZeroDivisionError: division by zero"


def test_a_run_past_its_time_is_killed():
    v = run_tests("def f(x):\n    while True:\n        pass\n", "f", ["assert f(1) == 1"], Limits(seconds=1.0))
    assert v.timed_out and v.failure == "Your code did not finish within 1 seconds." and v.seconds < 5


def test_memory_files_processes_and_network_are_confined(tmp_path):
    v = run_tests("x = bytearray(2 << 30)\ndef f():\n    return 1\n", "f", ["assert f() == 1"], Limits(memory_mb=256))
    assert v.failure.startswith("Loading your code raised MemoryError")
    outside = tmp_path / "written"
    v = run_tests(f"open({str(outside)!r}, 'w').write('x')\ndef f():\n    return 1\n", "f", ["assert f() == 1"])
    assert "the sandbox refuses writing" in v.failure and not outside.exists()
    v = run_tests("open('scratch.txt', 'w').write('x')\ndef f():\n    return 1\n", "f", ["assert f() == 1"])
    assert v.failure is None  # its own directory is writable
    v = run_tests("import os\nos.system('true')\ndef f():\n    return 1\n", "f", ["assert f() == 1"])
    assert v.failure == "Loading your code raised PermissionError: the sandbox refuses os.system"
    v = run_tests("import os\ndef f():\n    return sorted(os.environ)\n", "f", ["assert f() == 0"])
    assert "['HOME', 'LANG', 'PATH', 'TMPDIR']" in v.failure  # a cleared environment
    v = run_tests("import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 9))\ndef f():\n    return 1\n", "f",
                  ["assert f() == 1"])
    assert v.failure.startswith("Loading your code raised")  # no socket module, or the audit hook refuses it
    if isolation().startswith("netns"):
        code = "def f():\n    return sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:])\n"
        assert run_tests(code, "f", ["assert f() == ['lo']"]).failure is None  # a network namespace of its own


def test_extract_code():
    fenced = "Here:\n```python\ndef f(x):\n    return 1\n```\nand again\n```\ndef f(x):\n    return 2\n```"
    assert extract_code(fenced, "f") == "def f(x):\n    return 2\n"
    assert extract_code("<think>```python\nbad\n```</think>```py\nok\n```", "f") == "ok\n"
    assert extract_code("```python\ndef f(x):\n    return 3", "f") == "def f(x):\n    return 3"  # cut off
    assert extract_code("def f(x):\n    return 4", "f") == "def f(x):\n    return 4"
    assert extract_code("I do not know.", "f") is None


def test_the_task_set_and_its_reference_solutions():
    every = load_tasks(TaskSpec(tasks="code"))
    train, test = load_tasks(TaskSpec(tasks="code", split="train")), load_tasks(TaskSpec(tasks="code", split="test"))
    assert len(every) == 300 and len(train) + len(test) == 300 and not {p.id for p in train} & {p.id for p in test}
    assert len({p.id for p in every}) == 300
    for p in random.Random(0).sample(every, 12):  # a sample: each sandbox run is a fresh interpreter
        v = run_tests(p.answer, p.metadata["entry_point"], p.metadata["tests"])
        assert v.failure is None and v.passed == len(p.metadata["tests"]) >= 3, p.id


def test_users_code_tasks_from_jsonl(tmp_path):
    f = tmp_path / "code.jsonl"
    f.write_text(json.dumps({"id": "sq", "description": "Write `square(x)` returning x squared.", "entry_point": "square",
                             "tests": ["assert square(3) == 9"], "source": "mine"}) + "\n")
    (p,) = load_tasks(TaskSpec(tasks=str(f)))
    assert (p.id, p.question, p.answer) == ("sq", "Write `square(x)` returning x squared.", "")
    assert p.metadata == {"source": "mine", "entry_point": "square", "tests": ["assert square(3) == 9"]}
    f.write_text(json.dumps({"description": "d", "entry_point": "square", "tests": "assert square(3) == 9"}) + "\n")
    with pytest.raises(DriftError, match=r"code.jsonl:1: field 'tests' must be a non-empty list of Python statements"):
        load_tasks(TaskSpec(tasks=str(f)))


def test_code_environment_judges_and_feeds_back_the_first_failure():
    p = load_tasks(TaskSpec(tasks="code", num_problems=300))[0]
    entry = p.metadata["entry_point"]
    cfg = EnvConfig(env="code", max_turns=3)
    runner = EnvRunner(cfg)
    assert runner.pooled
    ep = Episode(p, 0, runner.resets([p])[0], cfg.max_turns)
    assert ep.messages[-1]["content"] == f"{p.question}\nAnswer with the complete function in one ```python code block."
    answers = ["no code here", f"```python\ndef {entry}(*args):\n    return None\n```", f"```python\n{p.answer}```"]
    for answer in answers:
        ep.answer(answer)
        ep.apply(runner.steps([ep])[0])
    t = ep.trajectory
    assert [turn.status for turn in t.turns] == ["unparseable", "wrong", "correct"] and t.success_turn == 3
    assert ep.messages[3]["content"].startswith("I could not find a Python code block")
    assert ep.messages[5]["content"].startswith(f"Test failed: assert {entry}(")
    assert t.turns[1].info["passed"] == 0 and t.turns[2].info["passed"] == t.turns[2].info["tests"]
    with pytest.raises(DriftError, match=r"code environment: time_limit \(9 s\) must be above 0 and below check_timeout"):
        EnvRunner(EnvConfig(env="code", env_args={"time_limit": 9}))
    with pytest.raises(DriftError, match=r"reset\(\) on problem 'x', turn 1, raised DriftError: problem 'x' is not a code task"):
        runner.resets([Problem(id="x", question="q", answer="1")])
