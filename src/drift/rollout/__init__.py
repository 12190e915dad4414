"""Rollouts: sample multi-turn try-again conversations once from a fixed reference model.

`engine` owns the loop and the run directory; backends (`hf`, `vllm_backend`, `openai_backend`)
only generate, behind the small protocol of `protocol`. Backend modules are imported when used.
"""

from __future__ import annotations

from drift.rollout.engine import RolloutConfig, is_complete, make_backend, read_manifest, run_rollout
from drift.rollout.protocol import Backend, BackendStats, GenOutput, GenRequest, PromptTooLong, SamplingParams

__all__ = ["Backend", "BackendStats", "GenOutput", "GenRequest", "PromptTooLong", "RolloutConfig", "SamplingParams",
           "is_complete", "make_backend", "read_manifest", "run_rollout"]
