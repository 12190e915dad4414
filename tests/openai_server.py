"""A small OpenAI-compatible chat-completions server over a tiny transformers model (a test helper).

`LocalServer(model_dir)` runs uvicorn in a background thread on 127.0.0.1 (a free port) and
serves `/v1/models` and `/v1/chat/completions` (n, seed, temperature, top_p, max_tokens, usage).
Its `state` lets a test inject faults: the next k requests answer HTTP 500 (or another status), every request waits
`delay` seconds, an API key is required, prompts beyond `max_context` tokens are refused with
the context-length error vLLM gives.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

MODEL_NAME = "tiny"


@dataclass
class ServerState:
    api_key: str | None = None
    fail_next: int = 0  # answer this many requests with HTTP `fail_status`
    fail_status: int = 500
    delay: float = 0.0  # seconds every request waits before it is served
    max_context: int = 2048
    requests: list[dict[str, Any]] = field(default_factory=list)  # bodies received
    lock: threading.Lock = field(default_factory=threading.Lock)
    wake: threading.Event = field(default_factory=threading.Event)  # ends pending delays at shutdown


def _error(status: int, message: str, kind: str) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "code": status}})


def make_app(model_dir: str, state: ServerState) -> Any:
    import torch
    from fastapi import Body, FastAPI, Header
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)  # the test machine's few cores are shared: more threads only contend
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    generate_lock = threading.Lock()  # one generation at a time: torch's global seed is shared
    app = FastAPI()

    def refused(authorization: str | None) -> Any:
        if state.api_key is not None and authorization != f"Bearer {state.api_key}":
            return _error(401, "Incorrect API key provided.", "invalid_request_error")
        return None

    @app.get("/v1/models")
    def models(authorization: str | None = Header(None)) -> Any:
        return refused(authorization) or {"object": "list", "data": [{"id": MODEL_NAME, "object": "model",
                                                                      "created": 0, "owned_by": "test"}]}

    @app.post("/v1/chat/completions")
    def chat(body: dict = Body(...), authorization: str | None = Header(None)) -> Any:
        if (refusal := refused(authorization)) is not None:
            return refusal
        with state.lock:
            state.requests.append(body)
            fail = state.fail_next > 0
            state.fail_next -= fail
        if fail:
            return _error(state.fail_status, "injected fault", "server_error")
        if state.delay:
            state.wake.wait(state.delay)
        if body.get("model") != MODEL_NAME:
            return _error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        text = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        if ids.shape[1] >= state.max_context:
            return _error(400, f"This model's maximum context length is {state.max_context} tokens. However, your "
                               f"messages resulted in {ids.shape[1]} tokens.", "BadRequestError")
        temperature, top_p = float(body.get("temperature", 1.0)), float(body.get("top_p", 1.0))
        max_tokens, seed = int(body.get("max_tokens") or 16), int(body.get("seed") or 0)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
        choices, completion_tokens = [], 0
        for i in range(int(body.get("n", 1))):
            with generate_lock, torch.no_grad():
                torch.manual_seed(seed + i)
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                     pad_token_id=tokenizer.pad_token_id, **sampling)
            new = out[0, ids.shape[1]:].tolist()
            stop = tokenizer.eos_token_id in new
            new = new[: new.index(tokenizer.eos_token_id) + 1] if stop else new
            completion_tokens += len(new)
            choices.append({"index": i, "finish_reason": "stop" if stop else "length", "logprobs": None,
                            "message": {"role": "assistant", "content": tokenizer.decode(new, skip_special_tokens=True)}})
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": MODEL_NAME, "choices": choices,
                "usage": {"prompt_tokens": ids.shape[1], "completion_tokens": completion_tokens,
                          "total_tokens": ids.shape[1] + completion_tokens}}

    return app


class LocalServer:
    """`with LocalServer(model_dir) as server:` serves at `server.url` until the block ends."""

    def __init__(self, model_dir: str, **state: Any):
        self.state = ServerState(**state)
        self.app = make_app(str(model_dir), self.state)

    def __enter__(self) -> LocalServer:
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.state.wake.set()
        self.server.should_exit = True
        self.thread.join(10)
