"""The hf backend on several CPU processes: each prompt group is sampled in one worker process.

On a CPU, a second thread in one process adds little to a small model's decode step, while two
processes run side by side at full speed (docs/benchmarks.md: two one-thread mul rollouts on
the two cores at once each ran at the speed of one alone). `HFWorkers` is a backend (and a
streaming one) that holds `workers` processes, each with its own `HFBackend` and cores/workers
torch threads, and routes requests to them:
- a prompt group goes to the worker with the fewest conversations in flight, and every later
  turn of its conversations to the same worker (which keeps their caches);
- `stream` runs one decode session in every worker; answers come back as each worker produces
  them, and the engine's next turns go straight to their worker;
- histories too long for the context are refused here, before anything is sent, exactly as
  `HFBackend` refuses them.
A conversation's samples are seeded per (prompt, sample, turn) as in one process, so in fp32 the
trajectories do not depend on the number of workers (bf16 rounding can differ with the batch
layout, as with any batch size). `stats` sums the workers' token counts; after `close`, it also
holds the CPU seconds and the peak memory (summed) of the workers, for the stage's ledger.
"""

from __future__ import annotations

import multiprocessing
import os
import traceback
from multiprocessing.connection import Connection, wait
from typing import Any

from drift import DriftError
from drift.rollout.protocol import BackendStats, ConvId, GenOutput, GenRequest, SamplingParams


class HFWorkers:
    name = "hf"

    def __init__(self, model_path: str, workers: int, batch_size: int = 16, dtype: str = "auto",
                 device: str | None = None, threads: int | None = None):
        from drift.hardware import resolve
        from drift.jobs import threads_per_job
        from drift.models import load_tokenizer

        device, dtype = resolve(dtype, device)
        if device != "cpu":
            raise DriftError(f"rollout workers > 1 are for CPUs (device {device}): one process batches a GPU better")
        self.tokenizer = load_tokenizer(model_path, model_path)
        ctx = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs = []
        args = (model_path, batch_size, dtype, device, threads or threads_per_job(workers), os.getpid())
        for _ in range(workers):
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=_serve, args=(theirs, *args), daemon=True)
            p.start()
            theirs.close()
            self.conns.append(mine)
            self.procs.append(p)
        hello = [self._recv(i) for i in range(workers)]
        self.hardware, self.context = hello[0]["hardware"], hello[0]["context"]
        self.stats = BackendStats(parameters=hello[0]["parameters"])
        self._worker_stats = [BackendStats() for _ in range(workers)]
        self.owner: dict[str, int] = {}  # prompt_id -> worker
        self.in_flight = [0] * workers  # conversations submitted and not answered, per worker

    # ---- routing ------------------------------------------------------------------------------

    def _route(self, requests: list[GenRequest]) -> list[list[GenRequest]]:
        """Requests per worker; a new prompt group goes to the least busy worker."""
        from drift.rollout.hf import fitting

        fitting(requests, self.tokenizer, self.context)  # raises before anything is sent
        shares: list[list[GenRequest]] = [[] for _ in self.conns]
        for r in requests:
            pid = r.conv_ids[0][0]
            if pid not in self.owner:
                self.owner[pid] = min(range(len(self.conns)), key=lambda w: self.in_flight[w])
            w = self.owner[pid]
            shares[w].append(r)
            self.in_flight[w] += len(r.conv_ids)
        return shares

    def _recv(self, w: int) -> Any:
        try:
            kind, payload = self.conns[w].recv()
        except EOFError:
            raise RuntimeError(f"rollout worker {w} ended unexpectedly (exit code {self.procs[w].exitcode})") from None
        if kind == "error":
            raise RuntimeError(f"rollout worker {w} failed:\n{payload}")
        if kind == "answers":
            answers, stats = payload
            self.in_flight[w] -= len(answers)
            self._worker_stats[w] = stats
            self.stats.prefill_tokens = sum(s.prefill_tokens for s in self._worker_stats)
            self.stats.generated_tokens = sum(s.generated_tokens for s in self._worker_stats)
            return answers
        return payload

    # ---- the Backend and StreamingBackend protocols -----------------------------------------

    def generate(self, requests: list[GenRequest], params: SamplingParams) -> list[list[GenOutput]]:
        shares = self._route(requests)
        busy = [w for w, share in enumerate(shares) if share]
        for w in busy:
            self.conns[w].send(("generate", (shares[w], params)))
        done: dict[ConvId, GenOutput] = {}
        for w in busy:
            done.update(self._recv(w))
        return [[done[c] for c in r.conv_ids] for r in requests]

    def stream(self, params: SamplingParams) -> _WorkerStream:
        for conn in self.conns:
            conn.send(("stream", params))
        return _WorkerStream(self)

    def release(self, conv_ids: list[ConvId]) -> None:
        per: dict[int, list[ConvId]] = {}
        for c in conv_ids:
            if c[0] in self.owner:
                per.setdefault(self.owner[c[0]], []).append(c)
        for w, ids in per.items():
            self.conns[w].send(("release", ids))

    def close(self) -> None:
        """Stop the workers; their CPU seconds and summed peak memory go to `stats`."""
        for w, conn in enumerate(self.conns):
            if self.procs[w].is_alive():
                conn.send(("close", None))
                final = self._recv(w)
                self.stats.cpu_seconds += final["cpu_seconds"]
                self.stats.peak_memory_bytes += final["peak_memory_bytes"]
        for p in self.procs:
            p.join(timeout=30)
        self.conns, self.procs = [], []


class _WorkerStream:
    def __init__(self, pool: HFWorkers):
        self.pool = pool

    def submit(self, requests: list[GenRequest]) -> None:
        for w, share in enumerate(self.pool._route(requests)):
            if share:
                self.pool.conns[w].send(("submit", share))

    def poll(self) -> list[tuple[ConvId, GenOutput]]:
        """The answers of every worker that has some (waiting for the first); empty: nothing in flight."""
        pool = self.pool
        if not any(pool.in_flight):
            return []
        ready = wait([c for w, c in enumerate(pool.conns) if pool.in_flight[w]])
        return [a for c in ready for a in pool._recv(pool.conns.index(c))]


def _serve(conn: Connection, model_path: str, batch_size: int, dtype: str, device: str, threads: int,
           parent: int) -> None:
    """A worker: one `HFBackend`, serving the parent's requests until it says close."""
    import torch

    from drift.jobs import watch_parent
    from drift.ledger import Cost, measure
    from drift.rollout.hf import HFBackend

    torch.set_num_threads(threads)
    watch_parent(parent)
    cost = Cost()
    try:
        with measure(cost):
            backend = HFBackend(model_path, batch_size=batch_size, dtype=dtype, device=device)
            conn.send(("hello", {"hardware": backend.hardware, "parameters": backend.stats.parameters,
                                 "context": backend.context}))
            _loop(conn, backend)
        conn.send(("closed", {"cpu_seconds": cost.cpu_seconds, "peak_memory_bytes": cost.peak_memory_bytes}))
    except Exception:
        conn.send(("error", traceback.format_exc()))


def _loop(conn: Connection, backend: Any) -> None:
    """Serve messages; while the stream has conversations queued, decode between messages."""
    stream, queued = None, 0
    while True:
        if queued and not conn.poll(0):
            answers = stream.poll()
            queued -= len(answers)
            conn.send(("answers", (answers, backend.stats)))
            continue
        kind, payload = conn.recv()
        if kind == "close":
            return
        if kind == "generate":
            requests, params = payload
            outs = backend.generate(requests, params)
            answers = [(c, o) for r, outs_r in zip(requests, outs) for c, o in zip(r.conv_ids, outs_r)]
            conn.send(("answers", (answers, backend.stats)))
        elif kind == "stream":
            stream = backend.stream(payload)
        elif kind == "submit":
            stream.submit(payload)
            queued += sum(len(r.conv_ids) for r in payload)
        elif kind == "release":
            backend.release(payload)
