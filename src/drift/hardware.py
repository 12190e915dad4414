"""What the hardware computes fast, and the dtype and device every stage uses by default.

`dtype = "auto"` means bfloat16 where the hardware has fast bf16 arithmetic and float32
elsewhere, so a machine without it never gets slower:
  - CUDA: `torch.cuda.is_bf16_supported()` (Ampere and newer);
  - CPU: the instructions the OS reports in /proc/cpuinfo: AMX (amx_bf16) or AVX512-BF16
    (avx512_bf16). Without them PyTorch emulates bf16 matrix products, many times slower than
    float32 (measured on an AMD EPYC with AVX2 only: 0.8 against 47 GFLOP/s on one core);
  - anything else (Apple MPS, other OSes): float32.
The device defaults to the accelerator when there is one (CUDA), else the CPU. The choice is
logged once per process and recorded by every stage that loads a model.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16")
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The instruction-set flags the OS reports for the first CPU (empty where it reports none)."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def fast_bf16(device: str, cpuinfo: str | None = None) -> bool:
    """Does `device` compute bf16 matrix products faster than float32?"""
    import torch

    if device.startswith("cuda"):
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device == "cpu":
        return any(f in cpu_flags(cpuinfo) for f in CPU_BF16_FLAGS)
    return False


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str | None = None) -> str:
    """"auto" -> "bfloat16" where `device` (default: the default device) has fast bf16, else "float32"."""
    if dtype not in DTYPES:
        from drift import DriftError

        raise DriftError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype != "auto":
        return dtype
    device = device or default_device()
    return _announce(device, "bfloat16" if fast_bf16(device) else "float32")


@functools.lru_cache(maxsize=None)
def _announce(device: str, dtype: str) -> str:
    reason = "fast bf16 arithmetic" if dtype == "bfloat16" else "no fast bf16 arithmetic"
    log.info("dtype auto on %s: %s (%s)", device, dtype, reason)
    return dtype
