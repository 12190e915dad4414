"""The online arm's typed config: the rollout stage's keys, the return's keys, and its own.

Task, environment and sampling keys are the rollout stage's own (`RolloutConfig`): the group
size is the rollout's `n`, so in a `drift run` config the online arm and DRIFT share one
[rollout] table and sample in the same environment. The return keys are the weights stage's
(`ReturnConfig`): both arms score a conversation the same way. The optimization keys (lr,
schedule, weight decay, clipping, max_length, the NLL cap, LoRA) are offline training's
(`drift.train.optim`) with the online preset `ONLINE_PRESET` as their defaults; with LoRA the
KL's reference is the base model with the adapter disabled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from drift import DriftError
from drift.bounds import check_bounds
from drift.config import option
from drift.rollout.config import RolloutConfig
from drift.train.optim import OnlineOptim, check_optim
from drift.weights import ReturnConfig

KL_DEFAULT = {"ufo": 0.001}  # matched: the DRIFT arm's beta


@dataclass
class OnlineConfig(RolloutConfig, ReturnConfig, OnlineOptim):
    output: str = option("", "directory of the online run: the final model, train_summary.json, state/, "
                         "iterations/ (required)", result=False)
    split: str = option("train", "which part of a built-in generator's problem space to train on")
    iterations: int = option(200, "optimizer iterations, each on a fresh on-policy batch")
    batch_prompts: int = option(8, "B: prompts per iteration (each sampled n times: the group size is --n)")
    scale_by_std: bool = option(False, "divide each group's centred returns by the group's std (GRPO)")
    keep_top: float = option(1.0, "train only this fraction of the batch's groups, those of largest return "
                             "spread (UFO: 0.25); groups with zero spread are always skipped")
    normalize: Literal["tokens", "sequences"] = option(
        "tokens", "tokens: the loss is summed over tokens and divided by the global batch's trained tokens; "
        "sequences: each conversation's mean token loss, averaged over conversations")
    minibatches: int = option(1, "optimizer steps per epoch over an iteration's batch (>1: PPO-clipped updates)")
    update_epochs: int = option(1, "passes over an iteration's batch (>1: PPO-clipped updates)")
    clip_low: float = option(0.2, "PPO ratio clip below 1 (used when minibatches or update_epochs > 1)")
    clip_high: float = option(0.28, "PPO ratio clip above 1")
    kl: Literal["none", "ufo", "matched"] = option(
        "none", "KL to the frozen reference: none; ufo (k1 in the reward, coefficient 0.001); matched (k3 in "
        "the loss with coefficient beta: the KL-regularized objective DRIFT's weights solve in closed form)")
    kl_coef: float | None = option(None, "override the KL coefficient (none: 0.001 for ufo, beta for matched)")
    beta: float = option(0.1, "the DRIFT arm's beta (the coefficient of kl = matched)")
    micro_batch_size: int = option(8, "conversations per forward/backward pass (gradients accumulate)", result=False)
    eval_every: int = option(10, "evaluate on held-out problems every this many iterations (and after the last; "
                             "0: only after the last)")
    eval: dict = option({"split": "test"}, "drift eval keys of the held-out evaluations (split, num_problems, ...); "
                        "the task and the environment keys default to this run's")
    save_every: int = option(1, "save the resumable state every this many iterations", result=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_returns()
        check_optim(self)
        check_bounds(self, ("beta", "kl_coef"))
        for key in ("iterations", "batch_prompts", "minibatches", "update_epochs", "micro_batch_size", "save_every"):
            if getattr(self, key) < 1:
                raise DriftError(f"config key '{key}' must be >= 1, got {getattr(self, key)}")
        for key in ("clip_low", "clip_high"):
            v = getattr(self, key)
            if not (math.isfinite(v) and v >= 0):
                raise DriftError(f"config key '{key}' must be a finite number >= 0, got {v}")
        if self.planted is not None:
            raise DriftError("planted answers apply to drift rollout and drift eval; the online arm samples its own "
                             "conversations from turn 1")
        if self.workers > 1:
            raise DriftError("config key 'workers' applies to rollout and eval stages: the online arm samples "
                             "from its policy in memory, in this process")
        if not 0 < self.keep_top <= 1:
            raise DriftError(f"config key 'keep_top' must be in (0, 1], got {self.keep_top}")
        if self.eval_every < 0:
            raise DriftError(f"config key 'eval_every' must be >= 0, got {self.eval_every}")
        if self.backend == "openai":
            raise DriftError("the online arm generates from the policy it trains: use backend hf or vllm")
        if self.n < 2:
            raise DriftError("the online arm needs n >= 2 samples per prompt (advantages are relative to the group)")

    @property
    def kl_coefficient(self) -> float:
        if self.kl == "none":
            return 0.0
        if self.kl_coef is not None:
            return self.kl_coef
        return KL_DEFAULT["ufo"] if self.kl == "ufo" else self.beta

    @property
    def ppo(self) -> bool:
        """Several updates per batch: the ratio to the sampling policy is no longer 1, so it is clipped."""
        return self.minibatches * self.update_epochs > 1

    @property
    def returns(self) -> ReturnConfig:
        return ReturnConfig(**{k: getattr(self, k) for k in ReturnConfig.__dataclass_fields__})
