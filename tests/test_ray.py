"""The rollout on Ray actors (`executor = "ray"`) on a local Ray cluster started by the tests:
the same trajectories as a local run (fp32), a SIGKILLed actor's groups reassigned, a SIGKILLed
driver's run resumed, bad Ray settings as one line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.xdist_group("ray")  # one worker runs them all, on one Ray instance

from drift import DriftError  # noqa: E402
from drift.records import read_trajectories  # noqa: E402
from drift.rollout import RolloutConfig, run_rollout  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance (2 CPUs) for every test of the session. Ray's memory monitor is off:
    it counts the whole machine's memory, which other jobs on a shared test machine use too."""
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def settings(model, **kw):
    return dict(model=str(model), tasks="arith", num_problems=8, n=2, max_turns=3, max_new_tokens=6, batch_size=4,
                dtype="float32", threads=1, seed=3, **kw)


def trajectories(run: Path) -> dict:
    rows = [json.dumps(t.to_json(), sort_keys=True) for t in read_trajectories(run / "trajectories")]
    keyed = {(r["prompt_id"], r["sample_idx"]): s for s, r in ((s, json.loads(s)) for s in rows)}
    assert len(keyed) == len(rows)  # nothing written twice
    return keyed


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("local") / "run"
    run_rollout(RolloutConfig(output=str(out), **settings(tiny_model_dir)))
    return trajectories(out)


def test_chunks_are_about_two_per_actor_and_never_below_what_an_actor_keeps_live():
    from drift.rollout.ray_exec import chunks

    groups = [(f"p{i}", [0, 1]) for i in range(10)]
    assert [[g[0] for g in c] for c in chunks(groups, 2, 1)] == [
        ["p0", "p4", "p8"], ["p1", "p5", "p9"], ["p2", "p6"], ["p3", "p7"]]
    assert [len(c) for c in chunks(groups, 2, 4)] == [4, 3, 3]  # 4 groups live per actor
    assert [len(c) for c in chunks(groups, 2, 16)] == [5, 5]  # more than there are: one chunk per actor
    assert [len(c) for c in chunks(groups[:1], 3, 16)] == [1]


def kill_actor_on_first_write(shards: Path, k: int) -> threading.Thread:
    """SIGKILL actor k's process once it has written a trajectory (its lock file holds its pid)."""
    def watch() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            files = list(shards.glob(f"shard-a{k}-*.jsonl"))
            if files and files[0].stat().st_size:
                os.kill(int((shards / f".writer-a{k}.lock").read_text()), signal.SIGKILL)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_two_actors_sample_what_one_process_samples_and_a_killed_actor_loses_nothing(
        ray_cluster, tiny_model_dir, local_run, tmp_path, caplog):
    out = tmp_path / "ray"
    killer = kill_actor_on_first_write(out / "trajectories", 0)
    manifest = run_rollout(RolloutConfig(output=str(out), executor="ray", num_actors=2, max_live=2,
                                         **settings(tiny_model_dir)))
    killer.join()
    assert "Ray actor 0 died" in caplog.text
    assert trajectories(out) == local_run  # every (prompt, sample) once, the same samples
    assert manifest["status"] == "complete" and manifest["counts"]["written"] == 16
    files = sorted(p.name for p in (out / "trajectories").glob("*.jsonl"))
    assert {f.rsplit("-", 1)[0] for f in files} == {"shard-a0", "shard-a1"}  # each actor its own shards
    assert manifest["hardware"] == {"device": "cpu", "dtype": "float32"} and manifest["cost"]["generated_tokens"] > 0


def test_a_sigkilled_driver_resumes_from_the_actors_shards(ray_cluster, tiny_model_dir, local_run, tmp_path):
    out = tmp_path / "run"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")])}
    cfg = settings(tiny_model_dir, output=str(out), executor="ray", num_actors=2, max_live=2, ray_address=ray_cluster)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "drift.cli", "rollout", "--config", str(tmp_path / "cfg.json")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not any(
            p.stat().st_size for p in (out / "trajectories").glob("shard-a*.jsonl")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_trajectories(out / "trajectories") and len(read_trajectories(out / "trajectories")) < 16
    manifest = run_rollout(RolloutConfig(**{**cfg, "resume": True}))
    assert manifest["status"] == "complete" and len(manifest["timings"]["sessions"]) == 2
    assert trajectories(out) == local_run


def test_bad_ray_settings_are_one_line_before_anything_is_generated(ray_cluster, tiny_model_dir, tmp_path):
    with pytest.raises(DriftError, match="'num_actors' is out of range: 0"):
        RolloutConfig(output=str(tmp_path / "a"), executor="ray", num_actors=0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DriftError, match=rf"cannot reach the Ray cluster at '127.0.0.1:{port}'"):
        run_rollout(RolloutConfig(output=str(tmp_path / "b"), executor="ray", ray_address=f"127.0.0.1:{port}",
                                  **settings(tiny_model_dir)))
    with pytest.raises(DriftError, match=r"^5 Ray actors with 1 CPU\(s\) each need 5 CPUs; the cluster has 2$"):
        run_rollout(RolloutConfig(output=str(tmp_path / "c"), executor="ray", num_actors=5, **settings(tiny_model_dir)))
    with pytest.raises(DriftError, match=r"^model path not found: /nonexistent$"):
        run_rollout(RolloutConfig(output=str(tmp_path / "d"), executor="ray", **settings("/nonexistent")))
    assert not any((tmp_path / x).exists() for x in "bcd")


def test_a_pipeline_on_ray_tasks_equals_the_serial_run(ray_cluster, tiny_model_dir, tmp_path):
    """`drift run` with executor ray: every stage a Ray task (the rollout's and the evaluations' sampling
    on an actor of their own), the same results as one process, each stage's log in the run directory."""
    from drift.config import build
    from drift.pipeline import RunConfig, run_pipeline
    from test_pipeline import config

    f32 = {"dtype": "float32"}  # the tasks run in Ray's workers: the test's cpuinfo patch does not reach them
    runs = {}
    for executor in ("local", "ray"):
        data = config(tmp_path / executor, tiny_model_dir, arms={"drift": {"method": "drift", "train": {"min_weight": 0.0}}},
                      executor=executor, jobs=2 if executor == "ray" else 1)
        data["rollout"] = {**data["rollout"], **f32, "executor": executor, "num_actors": 1}
        data["eval"] = {**data["eval"], **f32, "executor": executor, "num_actors": 1}
        data["train"] = {**data["train"], **f32}
        runs[executor] = tmp_path / executor / "run"
        run_pipeline(build(RunConfig, data))
    read = lambda run, f: json.loads((run / f).read_text())  # noqa: E731
    for f in ("eval/base/metrics.json", "eval/drift/metrics.json"):
        assert read(runs["ray"], f)["succ_at_k"] == read(runs["local"], f)["succ_at_k"], f
    loss = "train/drift/train_summary.json"
    assert read(runs["ray"], loss)["final_loss"] == pytest.approx(read(runs["local"], loss)["final_loss"], rel=1e-4)
    assert trajectories(runs["ray"] / "rollout") == trajectories(runs["local"] / "rollout")
    logs = sorted(p.name for p in (runs["ray"] / "logs").iterdir())
    assert logs == ["eval-base.log", "eval-drift.log", "rollout.log", "train-drift.log", "weights-drift.log"]
    assert all("Ray actors" in (runs["ray"] / f"logs/{f}.log").read_text() for f in ("rollout", "eval-base", "eval-drift"))
