"""The engine `accelerate launch` was asked for is the engine that runs, or the stage stops.

The launcher tells the processes which engine its config names (ACCELERATE_USE_FSDP,
ACCELERATE_USE_DEEPSPEED); an `Accelerator` may still set up another one without a word:
accelerate 1.16 turns an FSDP config into FSDP only on GPU-type devices (on a CPU its state
stays MULTI_CPU), and `Accelerator(cpu=True)`, the online arm's on a CPU, ignores a DeepSpeed
config. Either way the model would be trained unsharded, every process holding all of it. A run
that asked for sharding and would silently not get it stops here with one line instead
(docs/usage.md, "Training engines").
"""

from __future__ import annotations

import os
from typing import Any

from drift import DriftError

REQUESTS = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DEEPSPEED"}


def require_requested_engine(accelerator: Any, stage: str) -> None:
    """DriftError when the launcher asked for FSDP or DeepSpeed and `accelerator` set up something else."""
    got = accelerator.distributed_type.value
    for variable, engine in REQUESTS.items():
        if os.environ.get(variable, "false").lower() == "true" and got != engine:
            where = ("accelerate runs FSDP on GPUs only (on a CPU use DeepSpeed ZeRO)" if engine == "FSDP"
                     else f"{stage} does not run under DeepSpeed")
            raise DriftError(f"the accelerate config asks for {engine}, but {stage} set up {got} on "
                             f"{accelerator.device.type}: {where}; configs/accelerate/cpu_2proc.yaml runs plain "
                             "data parallelism")
