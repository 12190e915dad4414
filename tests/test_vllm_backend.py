"""The vllm backend without vLLM: request building, context check, LoRA rank, the import guard,
and the generate path against a stand-in `vllm` module that records what it is given."""

from __future__ import annotations

import json
import sys
import types
from types import SimpleNamespace

import pytest

from drift import DriftError
from drift.rollout import GenRequest, PromptTooLong, SamplingParams
from drift.rollout.protocol import sample_seed
from drift.rollout.vllm_backend import VLLMBackend, build_requests, lora_rank, too_long

PARAMS = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=64, seed=5)
OPENING = [{"role": "user", "content": "What is 2 + 2?"}]
LATER = OPENING + [{"role": "assistant", "content": "5"}, {"role": "user", "content": "Incorrect."}]


def test_build_requests_sets_every_field():
    reqs = [GenRequest([("p", 0), ("p", 1), ("p", 2)], OPENING, 1), GenRequest([("q", 4)], LATER, 2)]
    built = build_requests(reqs, PARAMS)
    assert built == [
        (OPENING, {"n": 3, "temperature": 0.7, "top_p": 0.95, "max_tokens": 64, "seed": sample_seed(5, ("p", 0), 1)}),
        (LATER, {"n": 1, "temperature": 0.7, "top_p": 0.95, "max_tokens": 64, "seed": sample_seed(5, ("q", 4), 2)}),
    ]


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


class FakeTokenizer:
    """One token per character; the 'template' joins the message contents."""

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "".join(m["content"] for m in messages)

    def __call__(self, text, add_special_tokens):
        return {"input_ids": list(range(len(text)))}


class FakeLLM:
    """Records the engine arguments and generate calls; answers 'ok' n times per prompt."""

    instances: list[FakeLLM] = []

    def __init__(self, **kwargs):
        self.kwargs, self.calls = kwargs, []
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=kwargs.get("max_model_len") or 60))
        FakeLLM.instances.append(self)

    def get_tokenizer(self):
        return FakeTokenizer()

    def generate(self, prompts, sampling_params, lora_request=None, use_tqdm=True):
        self.calls.append((prompts, sampling_params, lora_request))
        return [SimpleNamespace(prompt_token_ids=p["prompt_token_ids"], num_cached_tokens=2,
                                outputs=[SimpleNamespace(text="ok", token_ids=[1, 2], finish_reason="length" if i else "stop")
                                         for i in range(sp["n"])])
                for p, sp in zip(prompts, sampling_params)]


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = FakeLLM, lambda **kw: kw
    lora = types.ModuleType("vllm.lora.request")
    lora.LoRARequest = lambda name, idx, path: ("lora", name, idx, path)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.lora", types.ModuleType("vllm.lora"))
    monkeypatch.setitem(sys.modules, "vllm.lora.request", lora)
    FakeLLM.instances.clear()
    return FakeLLM


def test_generate_through_a_stand_in_vllm(fake_vllm, tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 16}))
    b = VLLMBackend("model-dir", lora=str(tmp_path), seed=9)
    llm = fake_vllm.instances[0]
    assert llm.kwargs["enable_prefix_caching"] is True and llm.kwargs["enable_lora"] is True
    assert llm.kwargs["max_lora_rank"] == 16 and llm.kwargs["seed"] == 9
    out = b.generate([GenRequest([("p", 0), ("p", 1)], OPENING, 1), GenRequest([("q", 0)], LATER, 2)], PARAMS)
    assert [[o.finish_reason for o in group] for group in out] == [["stop", "length"], ["stop"]]
    prompts, sps, lora_request = llm.calls[0]
    assert [sp["n"] for sp in sps] == [2, 1] and lora_request == ("lora", "drift-adapter", 1, str(tmp_path))
    assert b.stats.generated_tokens == 6 and b.stats.prefill_tokens == len(prompts[0]["prompt_token_ids"]) + len(
        prompts[1]["prompt_token_ids"]) - 4
    with pytest.raises(PromptTooLong) as e:
        b.generate([GenRequest([("r", 0)], [{"role": "user", "content": "x" * 61}], 1)], PARAMS)
    assert e.value.conv_ids == [("r", 0)] and len(llm.calls) == 1  # nothing generated


@pytest.mark.parametrize("bf16,dtype", [(True, "bfloat16"), (False, "float32")])
def test_dtype_auto_is_resolved_before_vllm_sees_it(fake_vllm, monkeypatch, bf16, dtype):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    b = VLLMBackend("model-dir")
    assert fake_vllm.instances[0].kwargs["dtype"] == dtype and b.hardware == {"device": "cuda", "dtype": dtype}
    VLLMBackend("model-dir", dtype="float32")
    assert fake_vllm.instances[1].kwargs["dtype"] == "float32"
