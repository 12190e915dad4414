"""Stages side by side: a dependency graph of jobs run on worker processes.

`drift run` with `jobs > 1` hands its unfinished steps here. On a CPU, one process's second
thread adds little to a small model's matmuls (docs/benchmarks.md: 11% for a bf16 1024x1024
matmul on this project's machine), while separate processes run at full speed each; so the
arms' independent stages run in `jobs` worker processes with cores/jobs torch threads each.

- A job starts once the jobs it reads from have finished; among the ready ones, those with the
  most jobs waiting on them (directly or not) first, then in plan order: the longest chain
  should not wait behind a side branch.
- Workers are spawned (no lock or thread pool inherited half-taken) and kept for the whole
  run, so the libraries are imported once per worker. A job's output, its log lines and
  progress bars, goes to its own log file; the console shows which jobs run and finish.
- A job computes exactly what it computes in a serial run: the same function on the same
  config, in a process of its own instead of the caller's.
- The first failure stops the running jobs (their stages resume like any interrupted stage)
  and is raised, naming the job's log file. A worker whose parent is gone (a SIGKILLed `drift
  run`) ends itself, so that the rerun finds no stage still running.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drift import DriftError

log = logging.getLogger(__name__)


@dataclass
class Job:
    name: str
    after: Sequence[str]  # names of the jobs (or of work finished before) whose outputs this one reads
    fn: Callable[..., Any]  # module-level (it is pickled to the worker)
    args: tuple[Any, ...]
    log_file: Path


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_job(jobs: int) -> int:
    return max(1, cores() // jobs)


def run_jobs(graph: list[Job], jobs: int, finished: set[str], ray: dict[str, Any] | None = None) -> None:
    """Run every job of `graph` on `jobs` worker processes, each after the jobs it reads from
    (`finished`: names of work done before, which jobs may read from too). With `ray` (the
    keywords of `drift.ray_tasks.RayTaskPool`), each job is a Ray task instead, `jobs` at once."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    done = set(finished)
    unknown = [(j.name, a) for j in graph for a in j.after if a not in done | {j.name for j in graph}]
    if unknown:
        raise ValueError(f"jobs read from work that is neither finished nor in the graph: {unknown}")
    waiting = sorted(graph, key=lambda j: -len(_downstream(graph, j.name)))  # stable: plan order among equals
    running: dict[concurrent.futures.Future, tuple[Job, float]] = {}
    pool = _pool(jobs, ray)
    log.info("%d jobs, %d at once %s; each job logs to its own file in %s", len(graph), jobs,
             "as Ray tasks" if ray is not None else f"on worker processes, {threads_per_job(jobs)} torch thread(s) each",
             graph[0].log_file.parent if graph else "-")
    try:
        with logging_redirect_tqdm(), tqdm(total=len(graph), unit="stage", desc="stages") as bar:
            while waiting or running:
                for job in [j for j in waiting if all(a in done for a in j.after)][:jobs - len(running)]:
                    job.log_file.parent.mkdir(parents=True, exist_ok=True)
                    log.info("stage %s: running (log: %s)", job.name, job.log_file)
                    running[pool.schedule(_call, args=(job.fn, job.args, str(job.log_file)))] = (job, time.monotonic())
                    waiting.remove(job)
                if not running:
                    raise ValueError(f"jobs wait on each other: {[j.name for j in waiting]}")
                bar.set_postfix_str(", ".join(j.name for j, _ in running.values()))
                ended, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in ended:
                    job, t0 = running.pop(future)
                    _result(future, job)
                    log.info("stage %s: done in %.0f s", job.name, time.monotonic() - t0)
                    done.add(job.name)
                    bar.update()
    finally:
        for future in running:
            future.cancel()  # pebble stops the worker running it
        pool.stop()
        pool.join()


def _pool(jobs: int, ray: dict[str, Any] | None) -> Any:
    """Where the jobs run: spawned worker processes, or Ray tasks (`drift.ray_tasks`, an optional extra)."""
    if ray is not None:
        from drift.ray_tasks import RayTaskPool

        return RayTaskPool(**ray)
    from pebble import ProcessPool

    return ProcessPool(max_workers=jobs, initializer=_init_worker,
                       initargs=(threads_per_job(jobs), logging.getLogger().level),
                       context=multiprocessing.get_context("spawn"))


def _downstream(graph: list[Job], name: str) -> set[str]:
    """The jobs that read from `name`, directly or through others."""
    found, todo = set(), [name]
    while todo:
        current = todo.pop()
        for j in graph:
            if current in j.after and j.name not in found:
                found.add(j.name)
                todo.append(j.name)
    return found


def _result(future: concurrent.futures.Future, job: Job) -> None:
    """The job's result; its failure raised with the log file named."""
    try:
        future.result()
    except DriftError as e:
        raise DriftError(f"{e} (log: {job.log_file})") from None
    except Exception:
        log.error("stage %s failed (log: %s); finished stages are kept, rerun the same command to go on",
                  job.name, job.log_file)
        raise


def _init_worker(threads: int, level: int) -> None:
    import torch

    torch.set_num_threads(threads)
    watch_parent(os.getppid())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def watch_parent(parent: int) -> None:
    """End this worker process once its parent is gone: a SIGKILLed `drift run` (or rollout) must
    not leave work running on, holding its locks; the rerun resumes it."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _call(fn: Callable[..., Any], args: tuple[Any, ...], log_file: str) -> Any:
    """fn(*args) with the process's stdout and stderr appended to `log_file`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_file, "a", encoding="utf-8") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            return fn(*args)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
