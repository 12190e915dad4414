"""Backend for any OpenAI-compatible chat-completions server (vLLM serve, SGLang, TGI, ...).

One request per conversation and turn, turn 1 included (no `n` > 1): each sample then has its
own seed, as with the hf backend, so a resumed, partly done prompt group samples what an
uninterrupted run would have; `usage.completion_tokens` is that one sample's token count; and
servers without `n` support work unchanged. Servers with prefix caching (vLLM, SGLang, TGI 3)
compute a group's shared prompt once all the same.

Requests run on a bounded thread pool. The official client retries connection errors,
timeouts, 408, 409, 429 and 5xx `max_retries` times with exponential backoff (honouring
Retry-After; it logs each retry). With several servers (`drift.rollout.endpoints`), each
conversation stays on the server it started on, and when the client gives up on a server its
conversations go on at the others; when it gives up on the last one, or on any other refusal,
the request is a one-line DriftError. The API key is read from an environment variable and
handed to the clients only: it is never logged or saved.
"""

from __future__ import annotations

import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from drift import DriftError
from drift.rollout.endpoints import Endpoint, EndpointPool, LostAll, check_models
from drift.rollout.protocol import BackendStats, ConvId, GenOutput, GenRequest, PromptTooLong, SamplingParams, sample_seed

# How servers word "the prompt does not fit" (vLLM, SGLang, TGI, OpenAI).
_CONTEXT = re.compile(r"context length|context window|maximum model length|max_model_len|"
                      r"longer than|too long|must be <= \d+", re.I)


# Statuses below 500 that the client retries (request timeout, conflict, rate limit).
_RETRIED = (408, 409, 429)


class _ContextOverflow(Exception):
    pass


class _GaveUp(Exception):
    """The client gave up on a server (its retries spent): the server is lost for this run."""


class OpenAIBackend:
    name = "openai"

    def __init__(self, base_url: str | list[str], model: str, api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 8, timeout: float = 60.0, max_retries: int = 3,
                 extra_body: dict[str, Any] | None = None):
        try:
            import openai
        except ImportError:
            raise DriftError("the openai backend needs the OpenAI client: pip install 'drift-rl[openai]'") from None

        self.urls = [base_url] if isinstance(base_url, str) else list(base_url)
        self.model, self.api_key_env, self.max_retries = model, api_key_env, max_retries
        self.extra_body = dict(extra_body or {})
        self.stats = BackendStats()
        self._lock = threading.Lock()
        key = os.environ.get(api_key_env) or "EMPTY"
        self.endpoints = EndpointPool(
            self.urls, lambda url: openai.OpenAI(base_url=url, api_key=key, max_retries=max_retries, timeout=timeout))
        # `concurrency` requests in flight per server
        self._pool = ThreadPoolExecutor(max_workers=concurrency * len(self.urls), thread_name_prefix="drift-openai")

    def check(self) -> None:
        """Before anything is generated: every server answers and serves the model (one DriftError if not)."""
        check_models(self.endpoints, self.model, _reason)

    def report(self) -> list[dict[str, Any]]:
        """Each server's requests, tokens and state (live, or lost and why), for the manifest."""
        return self.endpoints.report()

    def generate(self, requests: list[GenRequest], params: SamplingParams) -> list[list[GenOutput]]:
        jobs: list[tuple[ConvId, GenRequest]] = [(conv, req) for req in requests for conv in req.conv_ids]
        futures = [self._pool.submit(self._complete, conv, req.messages, params, sample_seed(params.seed, conv, req.turn))
                   for conv, req in jobs]
        results, too_long, detail = [], [], ""
        try:
            for (conv, _), fut in zip(jobs, futures):
                try:
                    results.append(fut.result())
                except _ContextOverflow as e:
                    too_long.append(conv)
                    detail = str(e)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        if too_long:
            raise PromptTooLong(too_long, detail)
        it = iter(results)
        return [[next(it) for _ in req.conv_ids] for req in requests]

    def _complete(self, conv: ConvId, messages: list[dict[str, str]], params: SamplingParams, seed: int) -> GenOutput:
        """One answer, from the conversation's server; from another one if the client gives up on it."""
        while True:
            try:
                ep = self.endpoints.acquire(conv)
            except LostAll as e:
                raise DriftError(self._all_lost(str(e))) from None
            try:
                response = self._request(ep, messages, params, seed)
            except _GaveUp as e:
                self.endpoints.failed(ep, str(e))
                continue
            except BaseException:
                self.endpoints.failed(ep, None)
                raise
            self.endpoints.done(ep, response.usage)
            return self._output(ep, response)

    def _request(self, ep: Endpoint, messages: list[dict[str, str]], params: SamplingParams, seed: int) -> Any:
        import openai  # present: __init__ checked it

        try:
            return ep.client.chat.completions.create(
                model=self.model, messages=messages, n=1, temperature=params.temperature, top_p=params.top_p,
                max_tokens=params.max_new_tokens,
                seed=seed % 2**31,  # some servers keep seeds in 32-bit integers
                extra_body=self.extra_body or None)
        except openai.APIConnectionError as e:  # timeouts included
            raise _GaveUp(self._gave_up(e)) from None
        except openai.APIStatusError as e:
            reason = _reason(e)
            if e.status_code in _RETRIED or e.status_code >= 500:
                raise _GaveUp(self._gave_up(e)) from None
            if e.status_code in (400, 413, 422) and _CONTEXT.search(reason):
                raise _ContextOverflow(reason) from None
            hint = f" (is ${self.api_key_env} set to the server's key?)" if e.status_code in (401, 403) else ""
            raise DriftError(f"server {ep.url} refused the request: HTTP {e.status_code}: {reason}{hint}") from None

    def _gave_up(self, e: Exception) -> str:
        return f"failed after {self.max_retries + 1} attempt(s): {_reason(e)}"

    def _all_lost(self, reasons: str) -> str:
        if len(self.urls) == 1:
            return f"server {reasons}"
        return (f"all {len(self.urls)} servers stopped answering ({reasons}); the trajectories written so far are "
                "kept: resume once a server is back")

    def _output(self, ep: Endpoint, response: Any) -> GenOutput:
        if not response.choices:
            raise DriftError(f"server {ep.url} returned no choices for model {self.model!r}")
        choice = response.choices[0]
        usage = response.usage
        tokens = usage.completion_tokens if usage else 0
        with self._lock:
            self.stats.generated_tokens += tokens
            self.stats.prefill_tokens += usage.prompt_tokens if usage else 0
        return GenOutput(text=choice.message.content or "", tokens=tokens,
                         finish_reason="length" if choice.finish_reason == "length" else "stop")

    def release(self, conv_ids: list[ConvId]) -> None:
        """The servers keep no per-conversation state for us; only the routing forgets them."""
        self.endpoints.release(conv_ids)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.endpoints.close()


def _reason(e: Exception) -> str:
    """One line: the error and its cause (e.g. the connection error under "Connection error.")."""
    text = getattr(e, "message", None) or str(e)
    if e.__cause__ is not None:
        text += f" ({type(e.__cause__).__name__}: {e.__cause__})"
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."
