"""Which device and number format each stage computes in: `dtype = "auto"` resolved from the hardware.

bf16 halves the bytes every weight and activation moves and, on hardware with bf16 units, runs
matmuls several times faster than fp32 (measured on a Xeon with AMX: 6.4x for a 1024x1024 matmul
on one thread). Without such units it is emulated and far slower than fp32 (measured on an AMD
EPYC without AVX512-BF16: 40x slower), so "auto" picks bf16 only where the hardware says it has
them:
- CUDA devices: `torch.cuda.is_bf16_supported()` (Ampere and later);
- CPUs on Linux: the `amx_bf16` or `avx512_bf16` flag in /proc/cpuinfo, the kernel's report of
  what the processor implements (torch has no public report of it);
- anything else (other operating systems, other devices): fp32.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from drift import DriftError

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16")
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = Path("/proc/cpuinfo")


def default_device() -> str:
    """"cuda" when a CUDA device is visible, else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of the first processor listed in /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def _read_cpuinfo() -> str:
    try:
        return CPUINFO.read_text()
    except OSError:  # not Linux, or /proc hidden: no report, so no claim of fast bf16
        return ""


def fast_bf16(device: str) -> bool:
    """Does `device` compute bf16 faster than fp32 (see the module docstring)?"""
    import torch

    kind = device.split(":")[0]
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        return bool(cpu_flags(_read_cpuinfo()).intersection(CPU_BF16_FLAGS))
    return False


def resolve_dtype(dtype: str, device: str) -> str:
    """"float32" or "bfloat16": `dtype` itself, or for "auto" bf16 where `fast_bf16(device)`."""
    if dtype not in DTYPES:
        raise DriftError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype != "auto":
        return dtype
    resolved = "bfloat16" if fast_bf16(device) else "float32"
    _log_choice(device, resolved)
    return resolved


@functools.cache
def _log_choice(device: str, resolved: str) -> None:
    """Say once per process (and device) what "auto" became."""
    why = "the hardware computes bf16 fast" if resolved == "bfloat16" else "no fast bf16 on this hardware"
    log.info("dtype auto on %s: %s (%s)", device, resolved, why)


def resolve(dtype: str, device: str | None) -> tuple[str, str]:
    """(device, dtype) with the defaults filled in: the accelerator if there is one, "auto" resolved."""
    device = device or default_device()
    return device, resolve_dtype(dtype, device)
