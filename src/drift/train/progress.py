"""What a training run has done so far, summed over processes and carried across resumes.

`Progress` is a TrainerCallback. It saves no checkpoint at the last step (see `on_step_end`).
When a checkpoint is fully saved (`on_save` runs after
transformers wrote it) it writes the checkpoint's record: the run's stage record (the settings
a resume must match), the optimizer step, the counters and the cost so far. A resumed run starts
from those numbers, so its summary counts what an uninterrupted run would have counted. (Peak
memory is the one exception: a process learns its own only at its end, so a checkpoint carries
that of the runs before it, not the part of its own run.)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from drift.ledger import Cost
from drift.records import write_json
from drift.rundir import checkpoint_record

COUNTERS = ("trained_tokens", "tokens", "slot_tokens", "capped_tokens")
"""trained (target) tokens; real (non-padding) tokens through forward and backward; token
slots including padding; negative-weight tokens whose NLL was past negative_nll_cap."""


class Progress(TrainerCallback):
    """The run's counters and cost so far; writes each checkpoint's record.

    trainer: the WeightedTrainer whose `counts` ([len(COUNTERS)], this process, this run) it sums;
    record: the run's stage record; carried: the record of the checkpoint resumed from (or None);
    started: (perf_counter, process_time) when the stage started; parameters: the model's count.
    """

    def __init__(self, trainer: Any, record: dict[str, Any], carried: dict[str, Any] | None,
                 started: tuple[float, float], parameters: int):
        self.trainer, self.record, self.parameters = trainer, record, parameters
        self.carried = carried or {}
        self.started = started
        self.loop_started = time.perf_counter()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.loop_started = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # No checkpoint at the last step: the model itself is saved right after it, and resuming
        # from a checkpoint of the last step makes transformers' Trainer train one step past
        # max_steps (it skips the trained batches, then steps before it checks the limit). A
        # run killed before its summary resumes from the checkpoint before and redoes the rest.
        if state.global_step >= state.max_steps:
            control.should_save = False

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # A collective: every process is here, so every process's part of the checkpoint is on disk.
        counters = self.counters()
        wall, cpu = time.perf_counter() - self.started[0], time.process_time() - self.started[1]
        cost = self.cost(Cost(wall_seconds=wall, cpu_seconds=cpu), counters)
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            write_json(checkpoint_record(checkpoint), {**self.record, "status": "complete", "step": state.global_step,
                                                       "counters": counters, "cost": cost.to_json()})

    def counters(self) -> dict[str, float]:
        """COUNTERS summed over processes plus the resumed checkpoint's, the training-loop seconds
        and the sum of the step losses (`loss_sum`; train_loss is its mean over the run's steps).
        A collective: every process must call it."""
        trainer = self.trainer
        local = trainer.accelerator.reduce(trainer.counts.to(trainer.args.device), reduction="sum").tolist()
        before = self.carried.get("counters", {})
        out: dict[str, float] = {k: int(before.get(k, 0) + v) for k, v in zip(COUNTERS, local)}
        out["seconds"] = before.get("seconds", 0.0) + time.perf_counter() - self.loop_started
        # the step losses, averaged over processes as the Trainer logs them, summed over the whole run
        loss = trainer.accelerator.reduce(trainer.loss_sum.to(trainer.args.device).float(), reduction="mean").item()
        out["loss_sum"] = before.get("loss_sum", 0.0) + loss
        return out

    def cost(self, measured: Cost, counters: dict[str, float]) -> Cost:
        """The stage's cost: this process's measured seconds and peak memory plus the resumed
        checkpoint's, with the run's token and step totals."""
        cost = measured + Cost.from_json(self.carried.get("cost"))
        cost.trained_tokens = int(counters["tokens"])
        cost.optimizer_steps = self.trainer.state.global_step
        cost.parameters = self.parameters
        return cost
