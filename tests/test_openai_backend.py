"""The openai backend end to end against a real local HTTP server over a tiny model."""

from __future__ import annotations

import json
import logging
import socket
import sys
import time
from pathlib import Path

import pytest
from openai_server import MODEL_NAME, LocalServer

from drift import DriftError
from drift.records import read_trajectories
from drift.rollout import GenRequest, PromptTooLong, RolloutConfig, SamplingParams, run_rollout
from drift.rollout.openai_backend import OpenAIBackend
from drift.tasks import Problem

PARAMS = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=5, seed=3)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with LocalServer(tiny_model_dir) as s:
        yield s


@pytest.fixture
def fresh(server):
    """The shared server with its fault injection reset."""
    st = server.state
    st.api_key, st.fail_next, st.fail_status, st.delay, st.max_context = None, 0, 500, 0.0, 2048
    st.requests.clear()
    return server


def backend(server, **kw) -> OpenAIBackend:
    return OpenAIBackend(server.url, MODEL_NAME, **{"timeout": 30.0, **kw})


def problems(k: int) -> list[Problem]:
    return [Problem(id=f"q{j}", question=f"What is {j} + 1?", answer=str(j + 1), checker="numeric", extract="number")
            for j in range(k)]


def test_server_speaks_the_openai_protocol(fresh):
    from openai import OpenAI

    client = OpenAI(base_url=fresh.url, api_key="EMPTY")
    assert [m.id for m in client.models.list()] == [MODEL_NAME]
    r = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], n=2,
                                       max_tokens=4, seed=1, temperature=1.0)
    assert len(r.choices) == 2 and 2 <= r.usage.completion_tokens <= 8
    assert {c.finish_reason for c in r.choices} <= {"stop", "length"}


def test_rollout_through_the_server(fresh, tmp_path):
    cfg = RolloutConfig(output=str(tmp_path / "run"), backend="openai", base_url=fresh.url, model=MODEL_NAME, n=3,
                        max_turns=2, max_new_tokens=5, top_p=0.9, concurrency=4, extra_body={"top_k": 5})
    manifest = run_rollout(cfg, problems(3))
    trajs = read_trajectories(tmp_path / "run" / "trajectories")
    assert sorted(t.key for t in trajs) == [(f"q{j}", i) for j in range(3) for i in range(3)]
    turns = sum(len(t.turns) for t in trajs)
    assert len(fresh.state.requests) == turns  # one request per conversation and turn
    body = fresh.state.requests[0]
    assert body["n"] == 1 and body["temperature"] == 1.0 and body["top_p"] == 0.9 and body["max_tokens"] == 5
    assert body["top_k"] == 5 and 0 <= body["seed"] < 2**31
    assert len({b["seed"] for b in fresh.state.requests}) == turns  # a seed per (prompt, sample, turn)
    assert manifest["status"] == "complete" and manifest["backend"] == "openai"
    assert manifest["summary"]["total_tokens"] == sum(tu.tokens for t in trajs for tu in t.turns) > 0


@pytest.mark.parametrize("status", [500, 503, 429, 408])
def test_retries_a_server_error_then_succeeds(fresh, caplog, status):
    caplog.set_level(logging.INFO, logger="openai")
    fresh.state.fail_next, fresh.state.fail_status = 2, status
    b = backend(fresh, max_retries=3)
    out = b.generate([GenRequest([("p", 0)], [{"role": "user", "content": "hi"}], 1)], PARAMS)
    assert len(out) == 1 and len(out[0]) == 1 and out[0][0].tokens > 0
    assert len(fresh.state.requests) == 3 and caplog.text.count("(retry ") == 2


def test_gives_up_after_max_retries(fresh):
    fresh.state.fail_next = 10
    with pytest.raises(DriftError, match=r"failed after 3 attempt\(s\): .*injected fault") as e:
        backend(fresh, max_retries=2).generate([GenRequest([("p", 0)], [{"role": "user", "content": "hi"}], 1)], PARAMS)
    assert fresh.url in str(e.value)


def test_wrong_key_is_a_clear_refusal(fresh, monkeypatch):
    fresh.state.api_key = "right-key"
    monkeypatch.setenv("DRIFT_TEST_KEY", "wrong-key-123")
    with pytest.raises(DriftError, match=r"refused the request: HTTP 401.*\$DRIFT_TEST_KEY") as e:
        backend(fresh, api_key_env="DRIFT_TEST_KEY").generate(
            [GenRequest([("p", 0)], [{"role": "user", "content": "hi"}], 1)], PARAMS)
    assert "wrong-key-123" not in str(e.value)
    assert len(fresh.state.requests) == 0  # refused before being served, and not retried


def test_timeout_is_an_error_not_a_hang(fresh):
    fresh.state.delay = 20.0
    start = time.monotonic()
    with pytest.raises(DriftError, match=r"failed after 2 attempt\(s\): Request timed out"):
        backend(fresh, timeout=0.3, max_retries=1).generate(
            [GenRequest([("p", 0)], [{"role": "user", "content": "hi"}], 1)], PARAMS)
    assert time.monotonic() - start < 5


def test_connection_refused():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DriftError, match=rf"127.0.0.1:{port}/v1 failed after 2 attempt\(s\): Connection error"):
        OpenAIBackend(f"http://127.0.0.1:{port}/v1", MODEL_NAME, max_retries=1).generate(
            [GenRequest([("p", 0)], [{"role": "user", "content": "hi"}], 1)], PARAMS)


def test_prompt_beyond_the_context_is_skipped(fresh, tmp_path):
    fresh.state.max_context = 300
    b = backend(fresh)
    long = [{"role": "user", "content": "x" * 400}]
    with pytest.raises(PromptTooLong) as e:
        b.generate([GenRequest([("a", 0)], [{"role": "user", "content": "hi"}], 1), GenRequest([("b", 0), ("b", 1)], long, 1)],
                   PARAMS)
    assert e.value.conv_ids == [("b", 0), ("b", 1)] and "maximum context length" in e.value.detail

    probs = problems(2) + [Problem(id="long", question="y" * 400, answer="1", checker="numeric", extract="number")]
    cfg = RolloutConfig(output=str(tmp_path / "run"), backend="openai", base_url=fresh.url, model=MODEL_NAME, n=2,
                        max_turns=2, max_new_tokens=4)
    manifest = run_rollout(cfg, probs)
    assert manifest["counts"] == {"problems": 3, "expected": 6, "written": 4, "skipped": 2}
    assert {s["prompt_id"] for s in manifest["skipped"]} == {"long"}


def test_api_key_never_logged_or_saved(fresh, tmp_path, monkeypatch, caplog, capsys):
    secret = "sk-drift-secret-7f3a9"
    fresh.state.api_key = secret
    fresh.state.fail_next = 1  # a retry, so warnings are logged too
    monkeypatch.setenv("DRIFT_SECRET_KEY", secret)
    caplog.set_level(logging.DEBUG)
    cfg = RolloutConfig(output=str(tmp_path / "run"), backend="openai", base_url=fresh.url, model=MODEL_NAME, n=2,
                        max_turns=1, max_new_tokens=4, api_key_env="DRIFT_SECRET_KEY")
    manifest = run_rollout(cfg, problems(2))
    assert manifest["counts"]["written"] == 4 and "retry" in caplog.text
    captured = capsys.readouterr()
    files = "".join(p.read_text() for p in Path(tmp_path / "run").rglob("*") if p.is_file())
    for text in (caplog.text, captured.out, captured.err, files, json.dumps(manifest)):
        assert secret not in text
    assert manifest["config"]["api_key_env"] == "DRIFT_SECRET_KEY"


def test_without_the_openai_client_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "openai", None)  # `import openai` raises ImportError
    with pytest.raises(DriftError, match=r"^the openai backend needs the OpenAI client: pip install 'drift-rl\[openai\]'$"):
        OpenAIBackend("http://127.0.0.1:9", MODEL_NAME)
