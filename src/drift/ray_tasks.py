"""`drift run` on a Ray cluster (`executor = "ray"`): each stage a Ray task instead of a worker process.

`drift.jobs.run_jobs` keeps the scheduling (a stage starts once what it reads has finished,
longest chain first, at most `jobs` at once, the first failure stops the others); this pool only
runs each stage somewhere on the cluster, as `num_cpus` / `num_gpus` of its resources, with that
many torch threads, its output appended to its own log file. A stage computes what it computes in
a local run: the same function on the same config; its records, fingerprints, locks and resume
are the files of the run directory, which must therefore be on storage every node sees. The
process that plans the run holds the run's lock; a SIGKILLed `drift run` takes its tasks with it
(Ray ends the tasks of a driver that is gone), and the rerun resumes them like any stage.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import RayTaskError

from drift.rollout.ray_exec import check_resources, connect


def _stage(call: Callable[..., Any], args: tuple[Any, ...], threads: int, level: int) -> Any:
    """A stage's task: torch threads and logging as in a local worker process, then `call(*args)`."""
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        force=True)
    return call(*args)


class RayTaskPool:
    """`schedule` returns a concurrent future of the call's Ray task (failing with the stage's own
    exception, not Ray's wrapper of it); `stop` cancels the tasks still running."""

    def __init__(self, address: str | None, num_cpus: float, num_gpus: float):
        self.started_ray = connect(address)
        check_resources(1, num_cpus, num_gpus)
        self.remote = ray.remote(_stage).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)
        self.threads = max(1, int(num_cpus))
        self.refs: dict[concurrent.futures.Future, Any] = {}

    def schedule(self, call: Callable[..., Any], args: tuple[Any, ...]) -> concurrent.futures.Future:
        ref = self.remote.remote(call, args, self.threads, logging.getLogger().level)
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_running_or_notify_cancel()

        def finished(task: concurrent.futures.Future) -> None:
            try:
                future.set_result(task.result())
            except RayTaskError as e:
                future.set_exception(e.cause if isinstance(e.cause, Exception) else e)
            except BaseException as e:  # the task was cancelled, or its worker died
                future.set_exception(e)

        ref.future().add_done_callback(finished)
        self.refs[future] = ref
        return future

    def stop(self) -> None:
        for future, ref in self.refs.items():
            if not future.done():
                ray.cancel(ref, force=True)

    def join(self) -> None:
        if self.started_ray:
            ray.shutdown()
