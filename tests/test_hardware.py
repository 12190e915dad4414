"""dtype auto: bf16 only where the hardware computes it fast, from what the OS and torch report."""

from __future__ import annotations

import pytest
import torch

from drift import hardware
from drift.hardware import cpu_flags, fast_bf16, resolve_dtype

XEON = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
EPYC = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"


def test_cpu_flags_from_cpuinfo_text():
    assert {"avx512_bf16", "amx_bf16"} <= cpu_flags(XEON)
    assert cpu_flags(EPYC) == {"fpu", "sse2", "avx", "avx2", "fma"}
    assert cpu_flags("") == set()


@pytest.mark.parametrize("cpuinfo,expected", [(XEON, True), (EPYC, False), ("", False),
                                              ("flags : avx512_bf16\n", True), ("flags : amx_bf16\n", True)])
def test_fast_bf16_on_cpus(cpuinfo, expected):
    assert fast_bf16("cpu", cpuinfo) is expected


def test_fast_bf16_on_cuda_follows_torch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert fast_bf16("cuda") and fast_bf16("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # e.g. a V100
    assert not fast_bf16("cuda")
    assert not fast_bf16("mps")


def test_resolve_dtype(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda cpuinfo=None: cpu_flags(XEON))
    assert resolve_dtype("auto", "cpu") == "bfloat16"
    monkeypatch.setattr(hardware, "cpu_flags", lambda cpuinfo=None: cpu_flags(EPYC))
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16" and resolve_dtype("float32", "cpu") == "float32"
    from drift import DriftError

    with pytest.raises(DriftError, match="dtype must be one of auto, float32, bfloat16"):
        resolve_dtype("fp16", "cpu")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_tiny_model_generates_in_both_dtypes(tiny_model_dir, dtype):
    from drift.rollout.hf import HFBackend
    from drift.rollout.protocol import GenRequest, SamplingParams

    backend = HFBackend(str(tiny_model_dir), batch_size=4, dtype=dtype, device="cpu")
    assert backend.model.dtype == getattr(torch, dtype)
    out = backend.generate([GenRequest([("p", 0), ("p", 1)], [{"role": "user", "content": "hi"}], 1)],
                           SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=5, seed=0))
    assert [o.tokens for o in out[0]] and all(1 <= o.tokens <= 5 for o in out[0])


def test_the_accelerator_is_the_default_device(monkeypatch):
    from drift.hardware import default_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == "cpu"
