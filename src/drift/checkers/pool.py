"""The worker processes that math-verify and user checker functions run in (pebble), and how a user
function travels to them by name.

math-verify's own timeouts use SIGALRM, which only works in the main thread, and a stuck sympy call
or user function can only be stopped by killing its process: each call has an outer timeout, on
expiry its worker is killed and replaced.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from typing import Any

from drift import DriftError

_POOLS: dict[int, Any] = {}  # worker count -> its pebble.ProcessPool
_POOLS_LOCK = threading.Lock()


def default_check_workers() -> int:
    return min(4, os.cpu_count() or 1)


def schedule(workers: int, fn: Callable, args: tuple, timeout: float) -> Future:
    """Call fn(*args) in the pool of `workers` checker processes.

    The timeout counts from the moment a worker starts the call (waiting for a free worker is not
    counted); a worker that overruns it is killed and replaced, and the future raises TimeoutError.
    """
    return _pool(workers).schedule(fn, args, timeout=timeout)


def outcome_of(future: Future) -> tuple[str, Any]:
    """("ok", value), ("timeout", None) (over time, or its process died) or ("error", "ExcType: message")."""
    from concurrent.futures import TimeoutError as Overtime
    from concurrent.futures.process import BrokenProcessPool

    from pebble import ProcessExpired

    try:
        return "ok", future.result()
    except (Overtime, ProcessExpired):
        return "timeout", None
    except BrokenProcessPool as e:
        raise DriftError(f"checker worker processes stopped ({e}); a Python script that runs checks must "
                         "guard its entry point with `if __name__ == \"__main__\":`") from None
    except Exception as e:
        return "error", f"{type(e).__name__}: {e}"


def _pool(workers: int) -> Any:
    """The process-wide pool of `workers` checker processes, started on first use (again if it broke).

    Workers are spawned interpreters rather than forks of the caller: by the time answers are
    checked the caller runs torch's thread pools and the backend's threads, and a forked child
    inherits their locks in whatever state they were. Spawn imports the caller's main script
    under the name __mp_main__, so its `if __name__ == "__main__":` block does not run again.
    """
    import multiprocessing

    from pebble import ProcessPool

    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None or not pool.active:
            if pool is not None:
                pool.stop()
                pool.join()
            pool = _POOLS[workers] = ProcessPool(workers, initializer=_prepare_worker,
                                                 context=multiprocessing.get_context("spawn"))
        return pool


def _prepare_worker() -> None:
    """(worker side) Import math-verify once, so that its import is not part of a check's time."""
    import math_verify  # noqa: F401


class FunctionByName:
    """A user function sent to the workers by its `module:function` name.

    A worker imports it while it receives the task, which pebble does before it starts the
    task's timer, so a slow first import does not count as a slow check; an import that fails
    there comes back as the call's error.
    """

    def __init__(self, spec: str):
        self.spec = spec

    def __reduce__(self) -> tuple:
        return _load_function, (self.spec,)


def _load_function(spec: str) -> Callable:
    """(worker side) The function `spec`, or one that raises why it cannot be imported here."""
    try:
        return resolve_function(spec)
    except DriftError as e:
        return partial(_raise, e)


def _raise(error: Exception, *args: Any) -> Any:
    raise error


def resolve_function(spec: str) -> Any:
    """The function a `module:function` spec names; DriftError saying what is missing."""
    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise DriftError(f"custom checker {spec!r}: expected the form module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise DriftError(f"custom checker {spec}: cannot import module {module_name!r} ({type(e).__name__}: {e})") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise DriftError(f"custom checker {spec}: module {module_name!r} has no function {func_name!r}")
    return fn
