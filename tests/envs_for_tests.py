"""Environments for tests/test_envs.py, imported by name (`envs_for_tests:NAME`) in the caller and in
the checker worker processes alike."""

from __future__ import annotations

import time

from drift.env import Step


class Echo:
    """Say the word: success ends the conversation; a wrong word gets a partial reward (not a success,
    info.correct false) and a feedback message list."""

    version = "2"

    def __init__(self, word: str = "go", in_process: bool = False):
        self.word, self.in_process = word, in_process

    def reset(self, problem):
        return [{"role": "user", "content": f"Say {self.word} ({problem['id']})"}]

    def step(self, problem, messages):
        said = messages[-1]["content"].strip()
        if said == self.word:
            return Step(1.0, True, None, {"answer": said})
        return Step(0.25, False, [{"role": "user", "content": f"not {said}"}], {"correct": False, "said": said})


def raising_factory(**kwargs):
    raise ValueError("no such level")


class NoStep:
    def reset(self, problem):
        return []


class Broken(Echo):
    """Echo that goes wrong in `how` (reset-raises, reset-type, step-raises, step-hangs, step-type, step-reward)."""

    def __init__(self, how: str, in_process: bool = False):
        super().__init__(in_process=in_process)
        self.how = how

    def reset(self, problem):
        if self.how == "reset-raises":
            raise KeyError("question")
        if self.how == "reset-type":
            return "Say go"
        return super().reset(problem)

    def step(self, problem, messages):
        if self.how == "step-raises" or (self.how == "step-raises-p1" and problem["id"] == "p1"):
            raise RuntimeError("grader offline")
        if self.how == "step-hangs":
            time.sleep(120)
        if self.how == "step-type":
            return {"reward": 1.0}
        if self.how == "step-reward":
            return Step(float("nan"), False)
        return super().step(problem, messages)
