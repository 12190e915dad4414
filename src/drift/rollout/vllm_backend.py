"""Backend on vLLM's offline engine (the optional extra: `pip install 'drift-rl[vllm]'`).

Prefix caching is on, so a prompt group's shared opening and each conversation's growing
history are computed once. A turn-1 request asks for the whole group at once (`n` = group size,
one seed: that of the group's first sample); later turns ask for one sample per live
conversation with its own seed. A LoRA adapter is applied with a `LoRARequest`. dtype "auto" is
resolved as for the other backends (bf16 on GPUs that compute it fast) and handed to vLLM by name
(its `dtype` argument takes "float32" and "bfloat16"; its own "auto", the checkpoint's dtype,
would give fp16 or fp32 checkpoints a different number format from the hf backend's).

Prompts are rendered with the model's chat template and tokenized here, so their length can be
checked against the context before anything is generated (`PromptTooLong`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from drift import DriftError
from drift.chat import render_ids
from drift.hardware import resolve_dtype
from drift.rollout.protocol import BackendStats, ConvId, GenOutput, GenRequest, PromptTooLong, SamplingParams, sample_seed

LORA_RANKS = (8, 16, 32, 64, 128, 256, 512)  # the max_lora_rank values vLLM accepts


def build_requests(requests: list[GenRequest], params: SamplingParams) -> list[tuple[list[dict[str, str]], dict[str, Any]]]:
    """(messages, keyword arguments of vllm.SamplingParams) per request, every sampling field explicit."""
    return [(req.messages, {"n": len(req.conv_ids), "temperature": params.temperature, "top_p": params.top_p,
                            "max_tokens": params.max_new_tokens,
                            "seed": sample_seed(params.seed, req.conv_ids[0], req.turn)})
            for req in requests]


def too_long(requests: list[GenRequest], prompt_lengths: list[int], max_model_len: int) -> list[ConvId]:
    """Conversations whose prompt leaves no room for one generated token."""
    return [c for req, n in zip(requests, prompt_lengths) if n >= max_model_len for c in req.conv_ids]


def lora_rank(adapter_dir: str) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds the adapter's rank."""
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        r = int(json.loads(path.read_text())["r"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DriftError(f"lora {adapter_dir}: cannot read the adapter rank from {path} ({e})") from None
    return fitting_rank(r, f"lora {adapter_dir}: ")


def fitting_rank(r: int, where: str = "") -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds rank r."""
    fitting = [k for k in LORA_RANKS if k >= r]
    if not fitting:
        raise DriftError(f"{where}rank {r} exceeds vLLM's largest ({LORA_RANKS[-1]})")
    return fitting[0]


class VLLMBackend:
    name = "vllm"

    def __init__(self, model: str, lora: str | None = None, seed: int = 0, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None, dtype: str = "auto",
                 max_lora_rank: int | None = None):
        try:
            import vllm
            from vllm.lora.request import LoRARequest
        except ImportError:
            raise DriftError("the vllm backend needs vLLM: pip install 'drift-rl[vllm]'") from None
        self._sampling_params = vllm.SamplingParams
        self._lora_request = LoRARequest
        self.hardware = {"device": "cuda", "dtype": resolve_dtype(dtype, "cuda")}
        self._lora = LoRARequest("drift-adapter", 1, lora) if lora else None
        kwargs: dict[str, Any] = dict(model=model, seed=seed, dtype=self.hardware["dtype"], enable_prefix_caching=True,
                                      tensor_parallel_size=tensor_parallel_size,
                                      gpu_memory_utilization=gpu_memory_utilization,
                                      enable_lora=lora is not None or max_lora_rank is not None)
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if lora or max_lora_rank is not None:
            kwargs["max_lora_rank"] = lora_rank(lora) if lora else fitting_rank(max_lora_rank)
        self.llm = vllm.LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.stats = BackendStats()

    def use_adapter(self, path: str, adapter_id: int) -> None:
        """Generate with the LoRA adapter saved at `path` from now on: the online arm's sync after each
        update. A new id makes vLLM load the new weights instead of a cached adapter of the same name."""
        self._lora = self._lora_request(f"drift-adapter-{adapter_id}", adapter_id, path)

    def generate(self, requests: list[GenRequest], params: SamplingParams) -> list[list[GenOutput]]:
        built = build_requests(requests, params)
        prompts = [self._tokenize(messages) for messages, _ in built]
        lengths = [len(p) for p in prompts]
        bad = too_long(requests, lengths, self.max_model_len)
        if bad:
            raise PromptTooLong(bad, f"prompt of up to {max(lengths)} tokens, context {self.max_model_len}")
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts],
                                    [self._sampling_params(**kw) for _, kw in built],
                                    lora_request=self._lora, use_tqdm=False)
        results = []
        for out in outputs:
            self.stats.prefill_tokens += len(out.prompt_token_ids) - (getattr(out, "num_cached_tokens", 0) or 0)
            samples = []
            for c in out.outputs:
                self.stats.generated_tokens += len(c.token_ids)
                samples.append(GenOutput(text=c.text, tokens=len(c.token_ids),
                                         finish_reason="length" if c.finish_reason == "length" else "stop"))
            results.append(samples)
        return results

    def _tokenize(self, messages: list[dict[str, str]]) -> list[int]:
        return render_ids(self.tokenizer, messages)

    def release(self, conv_ids: list[ConvId]) -> None:
        """vLLM's prefix cache evicts finished histories by itself."""

    def close(self) -> None:
        self.llm = None
