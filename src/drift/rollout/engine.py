"""The rollout stage: sample multi-turn try-again conversations once from a reference model.

A run directory holds
    trajectories/shard-NNNNN.jsonl   finished trajectories, `shard_size` per file, fsynced per write
    manifest.json                    model, tasks, sampling, backend, versions, counts, timings, summary
A run is complete only when the manifest says `"status": "complete"` (`is_complete`).

`RolloutConfig` extends `TaskSpec` and `EnvConfig`: their fields (`tasks`, `num_problems`,
`max_turns`, `feedback`, ...) are flat fields of the rollout config, so every one of them is a
CLI flag with its help text written once, and the config can be handed to `load_tasks` and
`Episode` as it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TypeVar

from drift import DriftError, __version__
from drift.config import option, settings, to_dict
from drift.env import EnvConfig, Episode
from drift.envs.runner import EnvRunner, env_identity
from drift.hardware import default_device, resolve_dtype
from drift.ledger import Cost, measure
from drift.metrics import compute_metrics
from drift.records import Trajectory, json_line, read_jsonl, read_trajectories, write_json
from drift.rollout.protocol import (Backend, ConvId, GenOutput, GenRequest, GenStream, PromptTooLong, SamplingParams,
                                   StreamingBackend)
from drift.rundir import Lock, RolloutDir, ensure_writable, mismatch, read_record, record, trained_record, with_model
from drift.tasks import Problem, TaskSpec, load_tasks

log = logging.getLogger(__name__)

MANIFEST_EVERY = 30.0  # seconds between manifest refreshes while running
R = TypeVar("R")


@dataclass
class RolloutConfig(TaskSpec, EnvConfig):
    model: str = option("smollm2-135m", "reference model: directory, hub name or alias (hf, vllm); served model name (openai)")
    output: str = option("", "run directory for trajectory shards and manifest.json (required)", result=False)
    backend: Literal["hf", "vllm", "openai"] = option("hf", "generation backend")
    n: int = option(8, "samples per prompt (the prompt group size)")
    temperature: float = option(1.0, "sampling temperature (0: greedy)")
    top_p: float = option(1.0, "nucleus sampling threshold")
    max_new_tokens: int = option(256, "maximum generated tokens per assistant turn")
    seed: int = option(0, "run seed; every (prompt, sample, turn) samples with its own seed derived from it")
    resume: bool = option(False, "complete an interrupted run in --output (same sampling, task and env settings)", result=False)
    shard_size: int = option(256, "trajectories per shard file", result=False)
    max_live: int | None = option(None, "conversations in flight; new prompt groups join as others finish "
                                  "(none: max(n, 4 x batch_size x workers))", result=False)
    batch_size: int = option(16, "hf: sequences per forward pass", result=False)
    stream_turns: bool = option(True, "hf: send a conversation's next turn into the running decode batch as soon as "
                                "its answer is judged (false: one generate call per turn for all live conversations)",
                                result=False)
    dtype: Literal["auto", "float32", "bfloat16"] = option(
        "auto", "hf, vllm: model dtype; auto: bfloat16 where the device computes it fast, else float32")
    device: str | None = option(None, "hf: torch device (none: the GPU when there is one, else the CPU)", result=False)
    threads: int | None = option(None, "hf: CPU threads for torch, per worker process (none: torch's default; "
                                 "with workers > 1, cores / workers)", result=False)
    workers: int = option(1, "hf on a CPU: processes sampling side by side, each holding the model and taking "
                          "whole prompt groups (`drift.rollout.workers`)", result=False)
    adapter: str | None = option(None, "vllm: a LoRA adapter directory served on top of the model")
    tensor_parallel_size: int = option(1, "vllm: GPUs per model", result=False)
    gpu_memory_utilization: float = option(0.9, "vllm: share of GPU memory vLLM may use", result=False)
    max_model_len: int | None = option(None, "vllm: context length (none: the model's)")
    base_url: str = option("http://127.0.0.1:8000/v1", "openai: base URL of the chat-completions server", result=False)
    api_key_env: str = option("OPENAI_API_KEY", "openai: environment variable holding the API key (never logged or saved)", result=False)
    concurrency: int = option(8, "openai: requests in flight", result=False)
    request_timeout: float = option(120.0, "openai: seconds per request attempt", result=False)
    max_retries: int = option(3, "openai: retries after connection errors, timeouts, 429 and 5xx (exponential backoff)", result=False)
    extra_body: dict = option({}, "openai: extra JSON fields for every request, e.g. {\"top_k\": 20}")

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [("n", self.n >= 1), ("temperature", self.temperature >= 0), ("top_p", 0 < self.top_p <= 1),
                  ("max_new_tokens", self.max_new_tokens >= 1), ("shard_size", self.shard_size >= 1),
                  ("batch_size", self.batch_size >= 1), ("max_live", self.max_live is None or self.max_live >= 1),
                  ("threads", self.threads is None or self.threads >= 1), ("workers", self.workers >= 1),
                  ("concurrency", self.concurrency >= 1), ("request_timeout", self.request_timeout > 0),
                  ("max_retries", self.max_retries >= 0)]
        for key, ok in checks:
            if not ok:
                raise DriftError(f"config key '{key}' is out of range: {getattr(self, key)!r}")
        if self.adapter and self.backend != "vllm":
            raise DriftError(f"LoRA adapters are applied by the vllm backend; with {self.backend}, "
                             "merge the adapter or serve it under its own model name")


def task_spec(cfg: RolloutConfig) -> TaskSpec:
    return TaskSpec(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(TaskSpec)})


def env_config(cfg: RolloutConfig) -> EnvConfig:
    return EnvConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(EnvConfig)})


def sampling_params(cfg: RolloutConfig) -> SamplingParams:
    return SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)


def make_backend(cfg: RolloutConfig, model_path: str | None = None) -> Backend:
    """The backend named by `cfg.backend` (its module is imported only now)."""
    if cfg.backend == "openai":
        from drift.rollout.openai_backend import OpenAIBackend

        return OpenAIBackend(cfg.base_url, cfg.model, api_key_env=cfg.api_key_env, concurrency=cfg.concurrency,
                             timeout=cfg.request_timeout, max_retries=cfg.max_retries, extra_body=cfg.extra_body)
    from drift.models import resolve_model

    path = model_path or resolve_model(cfg.model)
    if cfg.backend == "vllm":
        from drift.rollout.vllm_backend import VLLMBackend

        return VLLMBackend(path, lora=cfg.adapter, seed=cfg.seed, tensor_parallel_size=cfg.tensor_parallel_size,
                           gpu_memory_utilization=cfg.gpu_memory_utilization, max_model_len=cfg.max_model_len,
                           dtype=cfg.dtype)
    if cfg.workers > 1:
        from drift.rollout.workers import HFWorkers

        return HFWorkers(path, cfg.workers, batch_size=cfg.batch_size, dtype=cfg.dtype, device=cfg.device,
                         threads=cfg.threads)
    from drift.rollout.hf import HFBackend

    return HFBackend(path, batch_size=cfg.batch_size, dtype=cfg.dtype, device=cfg.device)


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


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    return read_record(RolloutDir(Path(directory)).manifest)


def is_complete(directory: str | Path) -> bool:
    """Did a rollout finish in `directory` (every expected trajectory written or counted as skipped)?"""
    manifest = read_manifest(directory)
    return manifest is not None and manifest.get("stage") == "rollout" and manifest.get("status") == "complete"


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
    created = not out.path.exists()
    ensure_writable(out.path)  # before the model loads: a bad --output fails in a second, not after minutes
    with Lock(out.path):
        previous = _check_run_dir(out, cfg, expected)
        try:
            return _run(cfg, out, problems, expected, previous, backend)
        except BaseException:
            if previous is None and not any(out.shards.glob("shard-*.jsonl")):
                out.manifest.unlink(missing_ok=True)
                if created:
                    shutil.rmtree(out.path, ignore_errors=True)
            raise


def stage_record(cfg: RolloutConfig, problems: list[Problem], model_record: dict[str, Any] | None) -> dict[str, Any]:
    """The rollout's stage record (`drift.rundir`): its settings, the problems, the model's origin."""
    s = with_model({**settings(cfg), **env_identity(cfg), "problems": tasks_fingerprint(problems),
                    "dtype": resolved_dtype(cfg)}, model_record)
    return record("rollout", s, model_record, cfg.model)


def resolved_dtype(cfg: RolloutConfig) -> str:
    """The dtype the rollout's model runs in (what `auto` means here); a remote server's is its own."""
    if cfg.backend == "openai":
        return cfg.dtype
    return resolve_dtype(cfg.dtype, "cuda" if cfg.backend == "vllm" else (cfg.device or default_device()))


def _run(cfg: RolloutConfig, out: RolloutDir, problems: list[Problem], expected: dict[str, Any],
         previous: dict[str, Any] | None, backend: Backend | None) -> dict[str, Any]:
    done = _scan_shards(out.shards)
    todo = [(p, missing) for p in problems if (missing := [i for i in range(cfg.n) if (p.id, i) not in done])]
    if done:
        log.info("resuming %s: %d trajectories on disk, %d prompt groups to (re)sample", out.path, len(done), len(todo))
    # step 2
    model_path = None
    own_backend = backend is None
    if own_backend:
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
            skipped = _sample(cfg, todo, backend, writer, refresh)
    finally:
        writer.close()
        if own_backend:
            backend.close()
        cost.cpu_seconds += backend.stats.cpu_seconds  # the backend's worker processes, if it has any
        cost.peak_memory_bytes += backend.stats.peak_memory_bytes
        manifest["cost"] = (before + cost).to_json()
        write_json(out.manifest, manifest)  # still "running": counts and timings of this session so far
    # step 4
    trajectories = read_trajectories(out.shards) if any(out.shards.glob("shard-*.jsonl")) else []
    _check_complete(trajectories, problems, cfg.n, skipped)
    if not trajectories:
        raise DriftError(f"rollout produced no trajectories: all {len(skipped)} conversations were skipped "
                         "(their prompts exceed the model context)")
    session["finished"] = _now()
    session["tokens_per_second"] = round(session["generated_tokens"] / max(session["wall_seconds"], 1e-9), 1)
    manifest["counts"].update(written=len(trajectories), skipped=len(skipped))
    manifest["skipped"] = skipped
    manifest["summary"] = summarize(trajectories, cfg.max_turns)
    manifest["status"] = "complete"
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
            group = {(problem.id, i): Episode(problem, i, opening, self.max_turns) for i in indices}
            requests.append(GenRequest(list(group), list(opening), 1))
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


class ShardWriter:
    """Appends trajectories to `shard-NNNNN.jsonl` files of `shard_size` lines; every write is flushed and fsynced.

    After a resume it continues the last shard on disk (whose torn tail `_scan_shards` removed).
    """

    def __init__(self, directory: Path, shard_size: int):
        self.directory, self.shard_size = directory, shard_size
        directory.mkdir(parents=True, exist_ok=True)
        shards = sorted(directory.glob("shard-*.jsonl"))
        self.index = int(shards[-1].stem.split("-")[1]) if shards else 0
        self.count = sum(1 for _ in read_jsonl(shards[-1])) if shards else 0
        self._file = None

    def write(self, trajectories: list[Trajectory]) -> None:
        for t in trajectories:
            if self._file is None or self.count >= self.shard_size:
                self._open_next()
            self._file.write(json_line(t.to_json()) + "\n")
            self.count += 1
        if trajectories:
            self._sync()

    def _open_next(self) -> None:
        if self._file is not None:
            self._sync()
            self._file.close()
        if self.count >= self.shard_size:
            self.index, self.count = self.index + 1, 0
        self._file = (self.directory / f"shard-{self.index:05d}.jsonl").open("a", encoding="utf-8")

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._sync()
            self._file.close()
            self._file = None


def _scan_shards(directory: Path) -> set[ConvId]:
    """Keys of the trajectories on disk. A torn last line (a write cut by a kill) is cut off the file."""
    done: set[ConvId] = set()
    for path in sorted(directory.glob("shard-*.jsonl")):
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted write", path, len(data) - end)
            with path.open("r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        for lineno, row in read_jsonl(path):
            try:
                key = (str(row["prompt_id"]), int(row["sample_idx"]))
            except (KeyError, TypeError, ValueError):
                raise DriftError(f"{path}:{lineno}: not a trajectory record") from None
            if key in done:
                raise DriftError(f"{path}:{lineno}: duplicate trajectory (prompt_id={key[0]!r}, sample_idx={key[1]})")
            done.add(key)
    return done


def _check_run_dir(out: RolloutDir, cfg: RolloutConfig, expected: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of the run to resume (None: a fresh run). Refuses to mix runs."""
    if not (out.path.is_dir() and any(p.name != ".drift.lock" for p in out.path.iterdir())):
        return None
    if not cfg.resume:
        raise DriftError(f"output directory {out.path} is not empty: pass --resume to complete that run, "
                         "or choose another --output")
    manifest = read_manifest(out.path)
    if manifest is None or manifest.get("stage") != "rollout":
        raise DriftError(f"cannot resume {out.path}: it is not a rollout directory (no {out.manifest.name})")
    differ = mismatch(manifest, expected)
    if differ:
        raise DriftError(f"cannot resume {out.path}: the run on disk was made with other settings ({'; '.join(differ)})")
    return manifest


def _check_complete(trajectories: list[Trajectory], problems: list[Problem], n: int, skipped: list[dict]) -> None:
    """Every expected (prompt_id, sample_idx) exactly once on disk, or skipped; nothing else."""
    expected = {(p.id, i) for p in problems for i in range(n)}
    seen: set[ConvId] = set()
    for t in trajectories:
        if t.key in seen:
            raise RuntimeError(f"duplicate trajectory {t.key} in the shards")
        seen.add(t.key)
    missing = expected - seen - {(s["prompt_id"], s["sample_idx"]) for s in skipped}
    extra = seen - expected
    if missing or extra:
        raise RuntimeError(f"shards do not match the run: {len(missing)} missing, {len(extra)} unexpected")


def tasks_fingerprint(problems: list[Problem]) -> str:
    """A hash of the problems (ids, questions, answers), to refuse resuming with other tasks."""
    h = hashlib.sha256()
    for p in problems:
        h.update(json.dumps([p.id, p.question, p.answer, p.messages], ensure_ascii=False).encode())
    return h.hexdigest()[:16]


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
    return table


def _versions(backend: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {"drift": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers") + {"openai": ("openai",), "vllm": ("vllm",)}.get(backend, ()):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
