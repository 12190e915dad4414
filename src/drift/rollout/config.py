"""The rollout config and what follows from it: the task and environment it names, the sampling
parameters, the dtype `auto` resolves to, the backend it builds, and the record of a stage that
samples problems with it (rollout, eval, online).

`RolloutConfig` extends `TaskSpec` and `EnvConfig`: their fields (`tasks`, `num_problems`,
`max_turns`, `feedback`, ...) are flat fields of the rollout config, so every one of them is a
CLI flag with its help text written once; `task_spec` and `env_config` take them back out for
`load_tasks` and the environment (`drift.envs.runner.EnvRunner`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from typing import Any, Literal

from drift import DriftError
from drift.config import option
from drift.env import EnvConfig
from drift.envs.runner import env_identity
from drift.hardware import default_device, resolve_dtype
from drift.rollout.endpoints import endpoint_urls
from drift.rollout.protocol import Backend, SamplingParams
from drift.rundir import config_record
from drift.tasks import Problem, TaskSpec

DEFAULT_URL = "http://127.0.0.1:8000/v1"


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
    planted: str | None = option(None, "correction contexts: turn 1 of every conversation is a given wrong answer and "
                                 "the model answers from turn 2; the answers from a planted.jsonl (rows prompt_id, "
                                 "response), an eval directory holding one, or a rollout whose most frequent wrong "
                                 "turn-1 answer per problem is planted (problems without one are left out)",
                                 result=False)
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
    vllm_args: dict = option({}, "vllm: more keyword arguments for vllm.LLM, e.g. {\"enforce_eager\": true}",
                             result=False)
    base_url: str | list[str] = option(DEFAULT_URL, "openai: base URL of the chat-completions server, or a list "
                                       "of servers of the same model (comma-separated on the command line)",
                                       result=False)
    endpoints: list[str] = option([], "openai: the servers' base URLs, instead of base_url; a new conversation goes "
                                  "to the one with the fewest requests in flight, its later turns to the same one",
                                  result=False)
    api_key_env: str = option("OPENAI_API_KEY", "openai: environment variable holding the API key (never logged or saved)", result=False)
    concurrency: int = option(8, "openai: requests in flight per server", result=False)
    request_timeout: float = option(120.0, "openai: seconds per request attempt", result=False)
    max_retries: int = option(3, "openai: retries after connection errors, timeouts, 429 and 5xx (exponential backoff)", result=False)
    extra_body: dict = option({}, "openai: extra JSON fields for every request, e.g. {\"top_k\": 20}")
    executor: Literal["local", "ray"] = option(
        "local", "local: sample in this process (and its `workers`); ray: hand whole prompt groups to `num_actors` "
        "Ray actors, each running this engine and the backend and writing shard files of its own "
        "(`drift.rollout.ray_exec`)", result=False)
    num_actors: int = option(2, "executor ray: actors sampling side by side", result=False)
    num_cpus: float = option(1.0, "executor ray: CPUs per actor (its torch threads unless `threads` is set)",
                             result=False)
    num_gpus: float = option(0.0, "executor ray: GPUs per actor", result=False)
    ray_address: str | None = option(None, "executor ray: the cluster to join (auto, host:port, ray://host:10001; "
                                     "none: $RAY_ADDRESS, else a Ray started on this machine for the stage)",
                                     result=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [("n", self.n >= 1), ("temperature", self.temperature >= 0), ("top_p", 0 < self.top_p <= 1),
                  ("max_new_tokens", self.max_new_tokens >= 1), ("shard_size", self.shard_size >= 1),
                  ("batch_size", self.batch_size >= 1), ("max_live", self.max_live is None or self.max_live >= 1),
                  ("threads", self.threads is None or self.threads >= 1), ("workers", self.workers >= 1),
                  ("concurrency", self.concurrency >= 1), ("request_timeout", self.request_timeout > 0),
                  ("max_retries", self.max_retries >= 0), ("num_actors", self.num_actors >= 1),
                  ("num_cpus", self.num_cpus >= 0), ("num_gpus", self.num_gpus >= 0)]
        for key, ok in checks:
            if not ok:
                raise DriftError(f"config key '{key}' is out of range: {getattr(self, key)!r}")
        if self.backend == "openai":
            endpoint_urls(self.base_url, self.endpoints, DEFAULT_URL)  # a malformed list fails now
        if self.executor == "ray" and importlib.util.find_spec("ray") is None:
            raise DriftError("executor 'ray' needs Ray: pip install 'drift-rl[ray]'")
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

        backend = OpenAIBackend(endpoint_urls(cfg.base_url, cfg.endpoints, DEFAULT_URL), cfg.model,
                                api_key_env=cfg.api_key_env, concurrency=cfg.concurrency, timeout=cfg.request_timeout,
                                max_retries=cfg.max_retries, extra_body=cfg.extra_body)
        try:
            backend.check()
        except BaseException:
            backend.close()
            raise
        return backend
    from drift.models import resolve_model

    path = model_path or resolve_model(cfg.model)
    if cfg.backend == "vllm":
        from drift.rollout.vllm_backend import VLLMBackend

        return VLLMBackend(path, lora=cfg.adapter, seed=cfg.seed, tensor_parallel_size=cfg.tensor_parallel_size,
                           gpu_memory_utilization=cfg.gpu_memory_utilization, max_model_len=cfg.max_model_len,
                           dtype=cfg.dtype, extra=cfg.vllm_args)
    if cfg.workers > 1:
        from drift.rollout.workers import HFWorkers

        return HFWorkers(path, cfg.workers, batch_size=cfg.batch_size, dtype=cfg.dtype, device=cfg.device,
                         threads=cfg.threads)
    from drift.rollout.hf import HFBackend

    return HFBackend(path, batch_size=cfg.batch_size, dtype=cfg.dtype, device=cfg.device)


def resolved_dtype(cfg: RolloutConfig) -> str:
    """The dtype the rollout's model runs in (what `auto` means here); a remote server's is its own."""
    if cfg.backend == "openai":
        return cfg.dtype
    if cfg.backend == "vllm":
        from drift.rollout.vllm_backend import vllm_device

        return resolve_dtype(cfg.dtype, vllm_device())
    return resolve_dtype(cfg.dtype, cfg.device or default_device())


def tasks_fingerprint(problems: list[Problem]) -> str:
    """A hash of the problems (ids, questions, answers, planted answers), to refuse resuming with other tasks."""
    h = hashlib.sha256()
    for p in problems:
        h.update(json.dumps([p.id, p.question, p.answer, p.messages] + ([p.planted] if p.planted is not None else []),
                            ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def sampling_record(stage: str, cfg: RolloutConfig, problems: list[Problem],
                    model_record: dict[str, Any] | None, **resolved: Any) -> dict[str, Any]:
    """The record of a stage that samples `problems` with `cfg.model` (`drift.rundir`): its settings
    with the environment's factory and version, the problems' fingerprint, the resolved dtype and
    what else the stage resolved (`resolved`); a model drift trained is its input."""
    return config_record(stage, cfg, model_record, cfg.model, model_record=model_record, **env_identity(cfg),
                         problems=tasks_fingerprint(problems), dtype=resolved_dtype(cfg), **resolved)
