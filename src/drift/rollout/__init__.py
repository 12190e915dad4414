"""Rollouts: sample multi-turn try-again conversations once from a fixed reference model.

`engine` owns the loop, `config` the rollout config and the backend it names, `shards` the run
directory's trajectory files; backends (`hf`, `vllm_backend`, `openai_backend`, `workers`) only
generate, behind the small protocol of `protocol`. Backend modules are imported when used.
"""

from __future__ import annotations

from drift.rollout.config import RolloutConfig, make_backend
from drift.rollout.engine import run_rollout
from drift.rollout.protocol import Backend, BackendStats, GenOutput, GenRequest, PromptTooLong, SamplingParams
from drift.rollout.shards import is_complete, read_manifest

__all__ = ["Backend", "BackendStats", "GenOutput", "GenRequest", "PromptTooLong", "RolloutConfig", "SamplingParams",
           "is_complete", "make_backend", "read_manifest", "run_rollout"]
