"""Several OpenAI-compatible servers: routing, stickiness, a server killed mid-rollout, all servers lost."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from openai_server import MODEL_NAME, LocalServer

from drift import DriftError
from drift.records import read_trajectories
from drift.rollout import RolloutConfig, run_rollout
from drift.rollout.endpoints import EndpointPool, LostAll, endpoint_urls
from drift.tasks import Problem

DEFAULT = "http://127.0.0.1:8000/v1"

SERVE = ("import sys, uvicorn; sys.path.insert(0, sys.argv[1]); from openai_server import ServerState, make_app; "
         "uvicorn.run(make_app(sys.argv[2], ServerState(delay=float(sys.argv[4]))), host='127.0.0.1', "
         "port=int(sys.argv[3]), log_level='warning')")


def problems(k: int) -> list[Problem]:
    return [Problem(id=f"q{j}", question=f"What is {j} + 1?", answer=str(j + 1), checker="numeric", extract="number")
            for j in range(k)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """The test server in a process of its own, so that the test can SIGKILL it."""

    def __init__(self, model_dir: Path, delay: float):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}/v1"
        self.proc = subprocess.Popen([sys.executable, "-c", SERVE, str(Path(__file__).parent), str(model_dir),
                                      str(port), str(delay)], env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.kill()
                    raise RuntimeError("test server process did not start")
                time.sleep(0.2)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


# ---- the endpoint list ------------------------------------------------------------------------

def test_endpoint_lists():
    assert endpoint_urls(DEFAULT, [], DEFAULT) == [DEFAULT]
    assert endpoint_urls("http://a:1/v1, http://b:2/v1/", [], DEFAULT) == ["http://a:1/v1", "http://b:2/v1"]
    assert endpoint_urls(["http://a:1/v1", "https://b/v1"], [], DEFAULT) == ["http://a:1/v1", "https://b/v1"]
    assert endpoint_urls(DEFAULT, ["http://a:1/v1"], DEFAULT) == ["http://a:1/v1"]


@pytest.mark.parametrize("base_url, endpoints, message", [
    ([], [], "endpoint list is empty"),
    ("", [], "endpoint list is empty"),
    (["http://a:1/v1", "a:2/v1"], [], "malformed server URL 'a:2/v1'"),
    (DEFAULT, ["ftp://a/v1"], "malformed server URL 'ftp://a/v1'"),
    (DEFAULT, ["http://a:99999/v1"], "malformed server URL"),
    (["http://a:1/v1", "http://a:1/v1/"], [], "listed twice"),
    ("http://a:1/v1", ["http://b:1/v1"], "not both"),
])
def test_a_bad_endpoint_list_is_one_line_at_config_time(base_url, endpoints, message, tmp_path):
    with pytest.raises(DriftError, match=message) as e:
        RolloutConfig(output=str(tmp_path), backend="openai", base_url=base_url, endpoints=endpoints)
    assert "\n" not in str(e.value)
    RolloutConfig(output=str(tmp_path), backend="hf", base_url=base_url, endpoints=endpoints)  # only openai reads them


def _fake_pool(n: int) -> EndpointPool:
    return EndpointPool([f"http://s{i}/v1" for i in range(n)], lambda url: SimpleNamespace(close=lambda: None))


def test_new_conversations_go_to_the_least_busy_server_and_stay():
    pool = _fake_pool(2)
    a, b = pool.acquire(("p", 0)), pool.acquire(("p", 1))
    assert (a.url, b.url) == ("http://s0/v1", "http://s1/v1")
    assert pool.acquire(("q", 0)) is a  # 1 and 1 in flight: the first
    assert pool.acquire(("q", 1)) is b  # 2 and 1
    pool.done(a, SimpleNamespace(completion_tokens=5, prompt_tokens=7))
    pool.done(a, None)  # s0: 0 in flight, s1: 2
    assert pool.acquire(("p", 1)) is b  # a later turn stays on its server, though s0 is idle
    assert pool.acquire(("r", 0)) is a  # a new one goes to the idle one
    assert [e["requests"] for e in pool.report()] == [2, 0]
    assert pool.report()[0]["generated_tokens"] == 5 and pool.report()[0]["prefill_tokens"] == 7
    pool.release([("p", 1)])
    assert pool.acquire(("p", 1)) is a  # a released conversation is forgotten


def test_a_lost_servers_conversations_move_and_the_last_loss_names_every_server():
    pool = _fake_pool(2)
    a = pool.acquire(("p", 0))
    pool.failed(a, "failed after 2 attempt(s): Connection error.")
    moved = pool.acquire(("p", 0))
    assert moved.url == "http://s1/v1" and pool.acquire(("q", 0)) is moved
    pool.failed(moved, "failed after 2 attempt(s): HTTP 503")
    with pytest.raises(LostAll, match=r"http://s0/v1 failed after .*Connection error.*http://s1/v1 failed .*503"):
        pool.acquire(("p", 0))
    assert [e["status"] for e in pool.report()] == ["lost", "lost"]


# ---- real servers -----------------------------------------------------------------------------

def test_a_server_killed_mid_rollout_loses_and_duplicates_nothing(tiny_model_dir, tmp_path, monkeypatch):
    """Two server processes; one is SIGKILLed while the rollout runs: its conversations finish on the
    other, every (prompt, sample) is written once, and the trajectories are those of a run on one server."""
    a, b = ServerProcess(tiny_model_dir, 0.05), ServerProcess(tiny_model_dir, 0.05)
    try:
        kw = dict(backend="openai", model=MODEL_NAME, n=2, max_turns=3, max_new_tokens=6, temperature=1.0,
                  concurrency=2, max_retries=1, request_timeout=20)
        probs = problems(6)
        answered = []
        done = EndpointPool.done

        def count_then_kill(pool, ep, usage):  # once b has answered 4 requests, it is SIGKILLed
            done(pool, ep, usage)
            if ep.url == b.url:
                answered.append(1)
                if len(answered) == 4:
                    b.kill()

        monkeypatch.setattr(EndpointPool, "done", count_then_kill)
        manifest = run_rollout(RolloutConfig(output=str(tmp_path / "two"), endpoints=[a.url, b.url], **kw), probs)
        assert len(answered) == 4 and b.proc.poll() is not None and manifest["counts"]["written"] == 12
        servers = {e["url"]: e for e in manifest["timings"]["sessions"][-1]["endpoints"]}
        assert servers[b.url]["status"] == "lost" and "attempt" in servers[b.url]["error"]
        assert servers[a.url]["status"] == "live" and servers[b.url]["requests"] > 0
        assert sum(e["generated_tokens"] for e in servers.values()) == manifest["cost"]["generated_tokens"]
        assert manifest["status"] == "complete" and manifest["counts"]["written"] == 12
        monkeypatch.undo()
        reference = run_rollout(RolloutConfig(output=str(tmp_path / "one"), base_url=a.url, **kw), probs)
        assert reference["summary"] == manifest["summary"]
    finally:
        a.kill()
        b.kill()
    two = {t.key: t.to_json() for t in read_trajectories(tmp_path / "two" / "trajectories")}
    one = {t.key: t.to_json() for t in read_trajectories(tmp_path / "one" / "trajectories")}
    assert len(two) == 12 and sorted(two) == sorted(one)
    assert all(two[k]["turns"] == one[k]["turns"] for k in one)  # the same samples: seeds per (prompt, sample, turn)


def test_all_servers_lost_stops_with_one_line_and_resumes(tiny_model_dir, tmp_path, monkeypatch):
    with LocalServer(tiny_model_dir) as s1, LocalServer(tiny_model_dir) as s2:
        cfg = RolloutConfig(output=str(tmp_path / "run"), backend="openai", model=MODEL_NAME, base_url=[s1.url, s2.url],
                            n=2, max_turns=2, max_new_tokens=4, concurrency=1, max_retries=0, max_live=2)
        answered = []
        done = EndpointPool.done

        def count_then_fail(pool, ep, usage):  # after 6 answers (a group and a half), both answer HTTP 500
            done(pool, ep, usage)
            answered.append(1)
            if len(answered) == 6:
                s1.state.fail_next = s2.state.fail_next = 10**6

        monkeypatch.setattr(EndpointPool, "done", count_then_fail)
        with pytest.raises(DriftError, match=r"^all 2 servers stopped answering \(.*injected fault.*\); the trajectories") as e:
            run_rollout(cfg, problems(8))
        assert "\n" not in str(e.value)
        written = len(read_trajectories(tmp_path / "run" / "trajectories"))
        assert 2 <= written < 16
        monkeypatch.undo()
        s1.state.fail_next = s2.state.fail_next = 0
        # resumed on one of the servers only: the server list is not a result setting
        manifest = run_rollout(RolloutConfig(**{**cfg.__dict__, "base_url": s2.url, "resume": True}), problems(8))
        assert manifest["counts"]["written"] == 16 and manifest["timings"]["sessions"][-1]["trajectories"] == 16 - written
        assert len({t.key for t in read_trajectories(tmp_path / "run" / "trajectories")}) == 16


def test_a_server_of_another_model_is_refused_before_anything_is_generated(tiny_model_dir, tmp_path):
    with LocalServer(tiny_model_dir) as s:
        cfg = RolloutConfig(output=str(tmp_path / "run"), backend="openai", model="other-model",
                            endpoints=[s.url], n=1, max_turns=1)
        with pytest.raises(DriftError, match=r"serves \['tiny'\], not model 'other-model'"):
            run_rollout(cfg, problems(2))
        assert not s.state.requests and not (tmp_path / "run").exists()
        dead = f"http://127.0.0.1:{free_port()}/v1"
        with pytest.raises(DriftError, match=rf"server {dead} does not answer"):
            run_rollout(RolloutConfig(**{**cfg.__dict__, "model": MODEL_NAME, "endpoints": [s.url, dead],
                                         "max_retries": 0}), problems(2))
        assert not s.state.requests and not (tmp_path / "run").exists()
