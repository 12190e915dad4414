"""dtype auto and the default device, decided from mocked hardware reports."""

from __future__ import annotations

import logging

import pytest
import torch

from drift import DriftError, hardware

XEON_AMX = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\nbogomips\t: 4000\n"
XEON_AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
EPYC_NO_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"


@pytest.fixture
def cpuinfo(monkeypatch):
    def report(text: str) -> None:
        monkeypatch.setattr(hardware, "_read_cpuinfo", lambda: text)
    return report


@pytest.mark.parametrize("text,fast", [(XEON_AMX, True), (XEON_AVX512_BF16, True), (EPYC_NO_BF16, False),
                                       ("", False)])
def test_cpu_bf16_from_cpuinfo_flags(cpuinfo, text, fast):
    cpuinfo(text)
    assert hardware.fast_bf16("cpu") is fast
    assert hardware.resolve_dtype("auto", "cpu") == ("bfloat16" if fast else "float32")


def test_cpu_flags_of_the_first_processor():
    assert hardware.cpu_flags(XEON_AMX) == {"fpu", "sse2", "avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
    assert hardware.cpu_flags("model name\t: Apple M2\n") == set()


@pytest.mark.parametrize("available,bf16,fast", [(True, True, True), (True, False, False), (False, True, False)])
def test_cuda_bf16_from_torch(monkeypatch, available, bf16, fast):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert hardware.fast_bf16("cuda:0") is fast
    assert hardware.resolve_dtype("auto", "cuda") == ("bfloat16" if fast else "float32")


def test_default_device_is_the_accelerator(monkeypatch, cpuinfo):
    cpuinfo(EPYC_NO_BF16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert hardware.resolve("auto", None) == ("cuda", "bfloat16")
    assert hardware.resolve("auto", "cpu") == ("cpu", "float32")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hardware.resolve("auto", None) == ("cpu", "float32")


def test_explicit_dtypes_are_kept_and_unknown_ones_refused(cpuinfo):
    cpuinfo(EPYC_NO_BF16)
    assert hardware.resolve_dtype("bfloat16", "cpu") == "bfloat16"
    assert hardware.resolve_dtype("float32", "cuda") == "float32"
    assert hardware.fast_bf16("mps") is False
    with pytest.raises(DriftError, match="dtype must be one of auto, float32, bfloat16, got 'float16'"):
        hardware.resolve_dtype("float16", "cpu")


def test_the_choice_is_logged_once(cpuinfo, caplog):
    cpuinfo(XEON_AMX)
    hardware._log_choice.cache_clear()
    with caplog.at_level(logging.INFO, logger="drift.hardware"):
        for _ in range(3):
            hardware.resolve_dtype("auto", "cpu")
    assert [r.getMessage() for r in caplog.records] == ["dtype auto on cpu: bfloat16 (the hardware computes bf16 fast)"]


@pytest.mark.parametrize("dtype,cpu,expected", [("auto", EPYC_NO_BF16, "float32"), ("auto", XEON_AMX, "bfloat16"),
                                                ("bfloat16", EPYC_NO_BF16, "bfloat16")])
def test_a_tiny_model_trains_in_the_resolved_dtype(tmp_path, tiny_model_dir, cpuinfo, dtype, cpu, expected):
    import json

    from drift.config import build
    from drift.train.trainer import TrainConfig, run_train

    cpuinfo(cpu)
    msgs = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "<answer>4</answer>"}]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt_id": str(i), "messages": msgs, "weight": 1.0}) + "\n" for i in range(4)))
    summary = run_train(build(TrainConfig, dict(model=str(tiny_model_dir), data=str(data), output=str(tmp_path / "out"),
                                                epochs=1, batch_size=2, dtype=dtype, save_steps=0)))
    assert summary["hardware"] == {"device": "cpu", "dtype": expected}
    assert summary["steps"] == 2 and summary["train_loss"] > 0
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}  # master weights stay fp32 under bf16 autocast


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_tiny_model_generates_in_both_dtypes(tiny_model_dir, dtype):
    from drift.rollout.hf import HFBackend
    from drift.rollout.protocol import GenRequest, SamplingParams

    backend = HFBackend(str(tiny_model_dir), batch_size=4, dtype=dtype, device="cpu")
    assert backend.model.dtype == getattr(torch, dtype) and backend.hardware == {"device": "cpu", "dtype": dtype}
    out = backend.generate([GenRequest([("p", 0), ("p", 1)], [{"role": "user", "content": "hi"}], 1)],
                           SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=5, seed=0))
    assert all(1 <= o.tokens <= 5 for o in out[0])
