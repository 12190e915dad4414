"""One cost ledger for every stage of every arm.

Every stage (rollout, weights, train, each online iteration, eval) records the same fields in
its summary file under "cost", so arms can be compared in one unit whatever they did:

    wall_seconds        elapsed time of the stage
    cpu_seconds         CPU time of this process (user + system; all its threads) and of the
                        rollout's worker processes (`workers > 1`)
    generated_tokens    tokens sampled by the policy
    prefill_tokens      prompt tokens actually run through the model (after any cache reuse)
    trained_tokens      every token through a forward and backward pass, context included
    aux_forward_tokens  tokens through forward-only passes beside training (reference or
                        old log-probabilities)
    optimizer_steps     parameter updates
    peak_memory_bytes   peak resident memory of the process during the stage (CPU: VmHWM, reset
                        at the start of the stage after freed memory is returned to the OS;
                        CUDA: peak allocated device memory); with rollout workers, plus the
                        sum of their peaks
    parameters          N, the model's parameter count (0: unknown, e.g. a remote server)

FLOPs are estimated with the usual dense-transformer rule (attention's sequence-length term
left out): a forward pass costs 2N per token, a forward and backward pass 6N per token, so
    flops = 2N * (prefill_tokens + generated_tokens + aux_forward_tokens) + 6N * trained_tokens.
With LoRA the backward skips the frozen weights' gradients; 6N then overstates training (the
same rule is used for every arm, so comparisons stay fair).
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import re
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class Cost:
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    generated_tokens: int = 0
    prefill_tokens: int = 0
    trained_tokens: int = 0
    aux_forward_tokens: int = 0
    optimizer_steps: int = 0
    peak_memory_bytes: int = 0
    parameters: int = 0

    @property
    def flops(self) -> float:
        """2N per forward token + 6N per trained token (see the module docstring)."""
        n = self.parameters
        return 2.0 * n * (self.prefill_tokens + self.generated_tokens + self.aux_forward_tokens) + 6.0 * n * self.trained_tokens

    def __add__(self, other: Cost) -> Cost:
        """Costs of stages run one after another: counts and times add, the peak is the larger."""
        out = Cost(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(Cost)})
        out.peak_memory_bytes = max(self.peak_memory_bytes, other.peak_memory_bytes)
        out.parameters = max(self.parameters, other.parameters)
        return out

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "wall_seconds": round(self.wall_seconds, 3),
                "cpu_seconds": round(self.cpu_seconds, 3), "flops": self.flops}

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> Cost:
        d = d or {}
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if d.get(f.name) is not None})


def parameter_count(model: Any) -> int:
    """All parameters of a (possibly peft-wrapped) model, trainable or not."""
    return sum(p.numel() for p in model.parameters())


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def release_memory() -> None:
    """Give back what earlier stages of this process freed: collect unreachable objects, then ask
    glibc to return free heap pages to the OS (measured: after a short SmolLM2-135M training the
    process held 2.8 GB, 2.0 GB after collection, 0.5 GB after the trim), so that a stage's peak
    is its own and not the leftovers of the stages before it in one `drift run`."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def reset_peak_memory(device: str | None = None) -> None:
    """Start the peak afresh from now (after `release_memory`)."""
    release_memory()
    if device and device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()
    try:  # Linux: writing 5 resets the process's peak resident set size (VmHWM)
        _CLEAR_REFS.write_text("5")
    except OSError:
        pass


def peak_memory(device: str | None = None) -> int:
    """Peak memory in bytes since the last reset: CUDA peak allocated, else VmHWM (else ru_maxrss)."""
    if device and device.startswith("cuda"):
        import torch

        return int(torch.cuda.max_memory_allocated())
    try:
        m = re.search(r"VmHWM:\s+(\d+) kB", _STATUS.read_text())
        if m:
            return int(m.group(1)) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak since the process started


@contextmanager
def measure(cost: Cost, device: str | None = None) -> Iterator[Cost]:
    """Add this block's wall and CPU seconds to `cost` and raise its peak memory to the block's.

    Token and step counts are the caller's to add; on an exception the times are still added.
    """
    reset_peak_memory(device)
    wall0, cpu0 = time.perf_counter(), _cpu_seconds()
    try:
        yield cost
    finally:
        cost.wall_seconds += time.perf_counter() - wall0
        cost.cpu_seconds += _cpu_seconds() - cpu0
        cost.peak_memory_bytes = max(cost.peak_memory_bytes, peak_memory(device))
