"""The rollout on a Ray cluster (`executor = "ray"`): whole prompt groups shared among Ray actors.

`RayActors` stands in for the backend of `drift.rollout.engine`'s stage: the stage still loads
the problems, checks and locks the run directory, keeps the manifest and checks the shards at
the end; only the sampling runs elsewhere. Each of `num_actors` actors (with `num_cpus` /
`num_gpus` each) builds drift's own backend (hf, vllm or openai) and runs the engine's loop on
the prompt groups it is handed, writing finished trajectories to shard files of its own
(`shard-a<k>-NNNNN.jsonl`, the format and fsync of every shard). Seeds are per (prompt, sample,
turn), so which actor samples a group changes nothing (in fp32; bf16 rounding follows the batch
layout, as with any batch size). A prompt group's samples stay on one actor, so the weights,
computed per group later, never need two actors' files.

- Work goes out in chunks of prompt groups, about two per actor (none smaller than what one actor
  keeps in flight, `max_live`), the next to whichever actor is free: a slow share does not hold
  the others back at the end, and an actor's batches are as full as a local run's.
- An actor that dies (its process killed, its node lost) is restarted once by Ray; the groups it
  had not written (read back from its own shard files, whose torn tail is cut) go back to the
  queue for any live actor. When every actor is gone, the stage stops with one line; what was
  written stays, and the rerun resumes from it.
- An actor holds a lock file (`.writer-a<k>.lock`) while it lives. A rerun waits for the locks of
  the previous run's actors (Ray ends them once their driver is gone, say a SIGKILLed `drift
  rollout`) before it reads the shards: no old actor can append behind the rerun's back.
The run directory must be on storage every node sees (a shared file system).
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError, RayTaskError
from tqdm.auto import tqdm

from drift import DriftError
from drift.ledger import Cost, measure
from drift.rollout.config import make_backend
from drift.rollout.engine import _sample
from drift.rollout.protocol import BackendStats
from drift.rollout.shards import ShardWriter, scan_shards
from drift.tasks import Problem

log = logging.getLogger(__name__)

CHUNKS_PER_ACTOR = 2
LOCK_WAIT = 120.0  # seconds a rerun waits for the previous run's actors to be gone
Todo = list[tuple[Problem, list[int]]]


def connect(address: str | None) -> bool:
    """Join the Ray cluster at `address` (None: $RAY_ADDRESS, else start one here); True if we started Ray.
    An address nobody answers at is one DriftError, not a minute of retries."""
    address = address or (None if ray.is_initialized() else os.environ.get("RAY_ADDRESS")) or None
    if address and address != "auto":
        hostport = address.removeprefix("ray://")
        host, _, port = hostport.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except (OSError, ValueError) as e:
            raise DriftError(f"cannot reach the Ray cluster at {address!r}: {e}") from None
    if ray.is_initialized():  # inside a Ray task, or a session the caller started
        return False
    try:
        if address:
            ray.init(address=address)
        else:
            ray.init(include_dashboard=False)
    except (ConnectionError, RuntimeError) as e:
        raise DriftError(f"cannot join the Ray cluster at {address or 'a new local instance'}: "
                         f"{' '.join(str(e).split())[:300]}") from None
    return not address


def check_resources(num_actors: int, num_cpus: float, num_gpus: float) -> None:
    """The cluster can hold every actor at once (else they would wait for resources for ever)."""
    total = ray.cluster_resources()
    for kind, each in (("CPU", num_cpus), ("GPU", num_gpus)):
        if each and num_actors * each > total.get(kind, 0):
            raise DriftError(f"{num_actors} Ray actors with {each:g} {kind}(s) each need {num_actors * each:g} {kind}s; "
                             f"the cluster has {total.get(kind, 0):g}")


def hold_lock(path: Path, wait: float = LOCK_WAIT) -> int:
    """An exclusive flock on `path` (waiting up to `wait` seconds for its holder to end); its fd."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())  # who holds it, for whoever looks
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise DriftError(f"{path} is still held after {wait:.0f} s: an actor of an earlier run still "
                                 "writes to this rollout") from None
            time.sleep(0.2)


def wait_for_writers(shards: Path) -> None:
    """Return once no actor of an earlier run holds its writer lock in `shards`."""
    for path in sorted(shards.glob(".writer-*.lock")) if shards.is_dir() else []:
        os.close(hold_lock(path))


class RolloutActor:
    """One Ray actor: drift's backend and the engine's loop on the prompt groups it is handed."""

    def __init__(self, cfg: Any, shards: str, index: int):
        self.shards, self.index, self.cfg = Path(shards), index, cfg
        self.shards.mkdir(parents=True, exist_ok=True)
        self._lock = hold_lock(self.shards / f".writer-a{index}.lock")
        torch.set_num_threads(cfg.threads or max(1, int(cfg.num_cpus)))
        self.cost, self.error = Cost(), None
        try:
            with measure(self.cost):
                self.backend = make_backend(cfg)
        except DriftError as e:  # raised by `hello`, as one line, instead of Ray's report of a dead actor
            self.error = e

    def hello(self) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        return {"pid": os.getpid(), "hardware": getattr(self.backend, "hardware", None),
                "parameters": self.backend.stats.parameters, "device": str(getattr(self.backend, "device", "cpu")),
                "node": ray.util.get_node_ip_address()}

    def sample(self, todo: Todo) -> dict[str, Any]:
        """Run these prompt groups to their end into this actor's shards."""
        written = []
        writer = ShardWriter(self.shards, self.cfg.shard_size, prefix=f"shard-a{self.index}")
        stats0 = dataclasses.replace(self.backend.stats)
        try:
            with measure(self.cost, str(getattr(self.backend, "device", "cpu"))):
                skipped = _sample(self.cfg, todo, self.backend, writer, written.append)
        finally:
            writer.close()
        return {"written": sum(written), "skipped": skipped,
                "generated_tokens": self.backend.stats.generated_tokens - stats0.generated_tokens,
                "prefill_tokens": self.backend.stats.prefill_tokens - stats0.prefill_tokens}

    def close(self) -> dict[str, Any]:
        os.close(self._lock)
        if self.error is not None:
            return {"cpu_seconds": self.cost.cpu_seconds, "peak_memory_bytes": self.cost.peak_memory_bytes}
        self.backend.close()
        return {"cpu_seconds": self.cost.cpu_seconds + self.backend.stats.cpu_seconds,
                "peak_memory_bytes": self.cost.peak_memory_bytes + self.backend.stats.peak_memory_bytes}


class RayActors:
    """The driver's side: starts the actors, hands out prompt groups, reassigns a dead actor's."""

    def __init__(self, cfg: Any, shards: Path):
        self.name, self.shards, self.stats = cfg.backend, shards, BackendStats()
        self.started_ray = connect(cfg.ray_address)
        try:
            check_resources(cfg.num_actors, cfg.num_cpus, cfg.num_gpus)
            wait_for_writers(shards)
            remote = ray.remote(RolloutActor).options(
                num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, max_restarts=1,
                runtime_env={"env_vars": {"TQDM_DISABLE": "1"}})  # the driver shows the progress
            local = dataclasses.replace(cfg, executor="local")
            self.actors = {k: remote.remote(local, str(shards), k) for k in range(cfg.num_actors)}
            hello = _get([a.hello.remote() for a in self.actors.values()], "starting")
        except BaseException:
            self.close()
            raise
        self.live_groups = -(-(cfg.max_live or max(cfg.n, 4 * cfg.batch_size * cfg.workers)) // cfg.n)
        self.hardware, self.device = hello[0]["hardware"], hello[0]["device"]
        self.stats.parameters = hello[0]["parameters"]
        log.info("%d Ray actors on %s, %g CPU(s) and %g GPU(s) each", len(self.actors),
                 ", ".join(sorted({h["node"] for h in hello})), cfg.num_cpus, cfg.num_gpus)

    def sample(self, todo: Todo, on_written: Callable[[int], None]) -> list[dict[str, Any]]:
        """Every group of `todo` sampled by some actor; the skipped conversations (as `_sample` gives them)."""
        queue = deque(chunks(todo, len(self.actors), self.live_groups))
        idle, failures = deque(self.actors), {k: 0 for k in self.actors}
        running: dict[Any, tuple[int, Todo]] = {}
        skipped: list[dict[str, Any]] = []
        with tqdm(total=len(todo), unit="prompt", desc=f"rollout ({len(self.actors)} Ray actors)") as bar:
            while queue or running:
                while idle and queue:
                    k, chunk = idle.popleft(), queue.popleft()
                    running[self.actors[k].sample.remote(chunk)] = (k, chunk)
                (ref,), _ = ray.wait(list(running), num_returns=1)
                k, chunk = running.pop(ref)
                try:
                    result = _get(ref, f"actor {k}")
                except RayActorError as e:
                    failures[k] += 1
                    left = self._unwritten(k, chunk, on_written)
                    if left:
                        queue.appendleft(left)
                    if failures[k] > 1:  # Ray restarts it once; a second death: it is gone
                        del self.actors[k]
                    else:
                        idle.append(k)
                    log.warning("Ray actor %d died (%s); its %d unwritten prompt group(s) go to %s", k,
                                _first_line(e), len(left), "the live actors" if self.actors else "no actor")
                    if not self.actors:
                        raise DriftError("every Ray actor died; the trajectories written so far are kept: rerun "
                                         "to resume") from None
                    continue
                self.stats.generated_tokens += result["generated_tokens"]
                self.stats.prefill_tokens += result["prefill_tokens"]
                skipped += result["skipped"]
                on_written(result["written"])
                bar.update(len(chunk))
                idle.append(k)
        return skipped

    def _unwritten(self, k: int, chunk: Todo, on_written: Callable[[int], None]) -> Todo:
        """The part of a dead actor's chunk not in its shard files (whose torn tail is cut off)."""
        on_disk = scan_shards(self.shards, f"shard-a{k}-[0-9]*.jsonl")
        left = [(p, missing) for p, idx in chunk if (missing := [i for i in idx if (p.id, i) not in on_disk])]
        on_written(sum(len(idx) for _, idx in chunk) - sum(len(idx) for _, idx in left))
        return left

    def release(self, conv_ids: list) -> None:
        """The actors' backends release their own conversations."""

    def close(self) -> None:
        """End the actors; their CPU seconds and summed peak memory go to `stats`."""
        actors = getattr(self, "actors", {})
        closing = {k: a.close.remote() for k, a in actors.items()}
        for k, ref in closing.items():
            try:
                final = ray.get(ref, timeout=120)
                self.stats.cpu_seconds += final["cpu_seconds"]
                self.stats.peak_memory_bytes += final["peak_memory_bytes"]
            except Exception as e:  # a dead actor has nothing to report
                log.warning("Ray actor %d did not close cleanly: %s", k, _first_line(e))
            ray.kill(actors[k])
        self.actors = {}
        if self.started_ray:
            ray.shutdown()


def chunks(todo: Todo, actors: int, live_groups: int) -> list[Todo]:
    """`todo` in chunks of prompt groups: about CHUNKS_PER_ACTOR per actor, but none smaller than the
    groups one actor keeps in flight (`live_groups`) while there are enough for every actor, since a
    chunk below that would run the actor's batches half empty."""
    size = max(-(-len(todo) // (CHUNKS_PER_ACTOR * actors)), min(live_groups, -(-len(todo) // actors)), 1)
    m = -(-len(todo) // size)
    return [todo[i::m] for i in range(m)]


def _get(refs: Any, what: str) -> Any:
    """ray.get, with an actor's own DriftError raised as itself (one line) and other failures named."""
    try:
        return ray.get(refs)
    except RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, DriftError):
            raise DriftError(str(cause)) from None
        raise RuntimeError(f"Ray {what} failed:\n{e}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
