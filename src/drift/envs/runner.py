"""Loading an environment and calling it for a batch of conversations, with one clear error per failure.

`EnvRunner(cfg)` loads `cfg.env` (a built-in name, `module:factory`, or `verifiers:NAME`) once per
process. An in-process environment (`in_process = True`) is called directly (`step_batch` when it
has one). Any other runs in the checker worker pool (`drift.checkers.schedule`): each worker builds
its own copy from the same factory and arguments, every call of a batch is submitted before any is
awaited, and each call has `check_timeout` seconds; a worker that overruns is killed and replaced.

Every failure is one DriftError line naming the environment, the call, the problem and the turn:
a factory that cannot be imported or raises, a `reset` or `step` that raises, hangs, or returns
the wrong type. With `env_failures = "record"` a failing `step` instead ends that conversation
with reward 0 and the error in the turn's info.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from drift import DriftError
from drift.checkers.pool import default_check_workers, outcome_of, schedule
from drift.env import EnvConfig, Episode, Step, messages_problem, problem_row, step_problem
from drift.tasks import Problem

log = logging.getLogger(__name__)

# built-in name -> (factory, preset arguments)
BUILTIN: dict[str, tuple[str, dict[str, Any]]] = {
    "try-again": ("drift.envs.try_again:TryAgain", {}),
    "hint": ("drift.envs.try_again:Hint", {}),
    "reference-full": ("drift.envs.try_again:Reference", {"mode": "full"}),
    "reference-simple": ("drift.envs.try_again:Reference", {"mode": "simple"}),
    "code": ("drift.envs.code:Code", {}),
}
VERIFIERS_PREFIX = "verifiers:"
VERIFIERS_FACTORY = "drift.envs.verifiers_env:Verifiers"
COMMON_KEYS = ("max_turns", "feedback", "system_prompt", "instruction", "check_timeout", "check_workers")


@dataclass(frozen=True)
class EnvSpec:
    """How to build an environment: the name the user gave, the factory, its keyword arguments (JSON)."""

    name: str
    factory: str
    kwargs: str

    def build(self) -> Any:
        fn = _resolve(self.name, self.factory)
        try:
            return fn(**json.loads(self.kwargs))
        except DriftError as e:
            raise DriftError(f"environment {self.name}: {e}") from None
        except Exception as e:
            raise DriftError(f"environment {self.name}: the factory {self.factory} raised {type(e).__name__}: {e}") from None


def env_spec(cfg: EnvConfig) -> EnvSpec:
    """The factory and arguments of `cfg.env`: built-ins also get the shared environment keys
    (feedback, system prompt, turn limit, ...); a user's factory gets `env_args` alone."""
    args = dict(cfg.env_args)
    if cfg.env in BUILTIN:
        factory, preset = BUILTIN[cfg.env]
        args = {**{k: getattr(cfg, k) for k in COMMON_KEYS}, **preset, **args}
        if not cfg.oracle:  # only then: the default's arguments (and so the stage settings) stay as they were
            args["oracle"] = False
    elif not cfg.oracle:  # a plug-in decides its own feedback: it might say nothing after a right answer
        raise DriftError(f"environment {cfg.env}: oracle = false (feedback after right answers) is offered by the "
                         "built-in environments only")
    elif cfg.env.startswith(VERIFIERS_PREFIX):
        factory = VERIFIERS_FACTORY
        args = {"name": cfg.env[len(VERIFIERS_PREFIX):], "feedback": cfg.feedback, **args}
    elif ":" in cfg.env:
        factory = cfg.env
    else:
        raise DriftError(f"environment {cfg.env!r}: not a built-in ({', '.join(BUILTIN)}), "
                         "module:factory, or verifiers:NAME")
    try:
        kwargs = json.dumps(args, sort_keys=True)
    except TypeError as e:
        raise DriftError(f"environment {cfg.env}: env_args must be JSON values ({e})") from None
    return EnvSpec(cfg.env, factory, kwargs)


def _resolve(name: str, factory: str) -> Callable[..., Any]:
    module_name, _, attr = factory.partition(":")
    if not module_name or not attr:
        raise DriftError(f"environment {name}: expected the form module:factory, got {factory!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise DriftError(f"environment {name}: cannot import module {module_name!r} ({type(e).__name__}: {e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise DriftError(f"environment {name}: module {module_name!r} has no factory {attr!r}")
    return fn


_BUILT: dict[EnvSpec, Any] = {}  # per process: the caller's, and each worker's own


def environment(spec: EnvSpec) -> Any:
    """The environment of `spec`, built once per process; checked to have reset and step."""
    if spec not in _BUILT:
        env = spec.build()
        for method in ("reset", "step"):
            if not callable(getattr(env, method, None)):
                raise DriftError(f"environment {spec.name}: the factory returned {type(env).__name__}, "
                                 f"which has no {method}() method")
        version = getattr(env, "version", None)
        if version is not None and not isinstance(version, str):
            raise DriftError(f"environment {spec.name}: version must be a string, got {version!r}")
        _BUILT[spec] = env
    return _BUILT[spec]


def env_identity(cfg: EnvConfig) -> dict[str, Any]:
    """What names the environment in a stage's settings besides `env` and `env_args`: its factory and version."""
    spec = env_spec(cfg)
    return {"env_factory": spec.factory, "env_version": getattr(environment(spec), "version", None)}


class EnvRunner:
    """Calls one environment for batches of conversations (see the module docstring)."""

    def __init__(self, cfg: EnvConfig):
        self.spec = env_spec(cfg)
        self.env = environment(self.spec)
        self.timeout, self.failures = cfg.check_timeout, cfg.env_failures
        self.workers = cfg.check_workers or default_check_workers()
        self.pooled = not getattr(self.env, "in_process", False)

    def check_problems(self, problems: Sequence[Problem]) -> None:
        """The environment's own check of the task rows before any sampling (where it has one)."""
        check = getattr(self.env, "check_problems", None)
        if check is not None:
            check([problem_row(p) for p in problems])

    def resets(self, problems: Sequence[Problem]) -> list[list[dict[str, str]]]:
        """The opening messages of each problem's conversations."""
        rows = [problem_row(p) for p in problems]
        if self.pooled:
            calls = [self._submit("reset", (row,)) for row in rows]
        else:
            calls = [self._here(self.env.reset, row) for row in rows]
        out = []
        for p, call in zip(problems, calls):
            value = self._outcome(call, "reset", p.id, 1)
            why = messages_problem(value) or (None if value else "is empty")
            if why:
                raise self._error("reset", p.id, 1, f"returned messages that {why}" if value else "returned no messages")
            out.append([dict(m) for m in value])
        return out

    def plant(self, episodes: Sequence[Episode]) -> None:
        """Answer turn 1 of each episode with its problem's planted answer, judged like any other."""
        for ep in episodes:
            ep.answer(ep.problem.planted)
        for ep, step in zip(episodes, self.steps(episodes)):
            ep.apply(step)
            if ep.done:
                raise DriftError(f"problem {ep.problem.id}: its planted answer ends the conversation at once "
                                 "(it is correct, or max_turns is 1): nothing is left to answer")

    def steps(self, episodes: Sequence[Episode]) -> list[Step]:
        """Judge each episode's last message (the model's answer)."""
        items = [(ep.row, list(ep.messages)) for ep in episodes]
        if self.pooled:
            calls = [self._submit("step", item) for item in items]
        elif hasattr(self.env, "step_batch") and self.failures == "stop":
            batch = self._here(self.env.step_batch, items)
            first = episodes[0] if episodes else None
            value = self._outcome(batch, "step", first.problem.id if first else "?", _turn(first) if first else 0)
            if not isinstance(value, list) or len(value) != len(items):
                raise self._error("step_batch", first.problem.id, _turn(first),
                                  f"returned {type(value).__name__}, not a list of {len(items)} Steps")
            calls = [("ok", v) for v in value]
        else:
            calls = [self._here(self.env.step, *item) for item in items]
        return [self._step(ep, call) for ep, call in zip(episodes, calls)]

    def _step(self, ep: Episode, call: Any) -> Step:
        turn = _turn(ep)
        outcome, value = outcome_of(call) if isinstance(call, Future) else call
        if outcome == "ok":
            why = step_problem(value)
            if why is None:
                return value
        error = self._error("step", ep.problem.id, turn, why if outcome == "ok" else self._failure(outcome, value))
        if self.failures == "stop":
            raise error
        log.warning("%s (recorded as a failed conversation)", error)
        return Step(reward=0.0, done=True, feedback=None,
                    info={"correct": False, "status": "timeout" if outcome == "timeout" else "wrong",
                          "env_error": str(error)})

    def _submit(self, method: str, args: tuple) -> Future:
        return schedule(self.workers, _call_in_worker, (_InWorker(self.spec), method, *args), self.timeout)

    @staticmethod
    def _here(fn: Callable[..., Any], *args: Any) -> tuple[str, Any]:
        try:
            return "ok", fn(*args)
        except DriftError:
            raise
        except Exception as e:
            return "error", f"{type(e).__name__}: {e}"

    def _outcome(self, call: Future | tuple[str, Any], method: str, problem_id: str, turn: int) -> Any:
        outcome, value = outcome_of(call) if isinstance(call, Future) else call
        if outcome != "ok":
            raise self._error(method, problem_id, turn, self._failure(outcome, value))
        return value

    def _failure(self, outcome: str, value: Any) -> str:
        return f"did not return within {self.timeout:g} s (check_timeout)" if outcome == "timeout" else f"raised {value}"

    def _error(self, method: str, problem_id: str, turn: int, what: str) -> DriftError:
        return DriftError(f"environment {self.spec.name}: {method}() on problem {problem_id!r}, turn {turn}, {what}")


def _turn(ep: Episode) -> int:
    return len(ep.trajectory.turns) + 1


class _InWorker:
    """An environment sent to a worker by its spec. The worker builds it (once: `environment` caches it)
    while it receives the call, which pebble does before it starts the call's timer, so a slow first
    import or taskset load does not count against `check_timeout`; a build that fails there comes back
    as the call's error."""

    def __init__(self, spec: EnvSpec):
        self.spec = spec

    def __reduce__(self) -> tuple:
        return _worker_environment, (self.spec,)


def _worker_environment(spec: EnvSpec) -> Any:
    """(worker side) The environment of `spec`, or a stand-in whose every call raises why it cannot be built."""
    try:
        return environment(spec)
    except DriftError as e:
        return _Unbuildable(e)


class _Unbuildable:
    def __init__(self, error: DriftError):
        self.error = error

    def __getattr__(self, name: str) -> Any:
        raise self.error


def _call_in_worker(env: Any, method: str, *args: Any) -> Any:
    """(worker side) Call one method of the environment built in this worker."""
    return getattr(env, method)(*args)
