"""Stages side by side (`jobs > 1`): the dependency order, per-job logs, the first failure stops
the rest, and a pipeline run on worker processes equals the serial one."""

import json
import os
import time

import pytest

from drift import DriftError
from drift.config import build
from drift.jobs import Job, run_jobs
from drift.pipeline import RunConfig, plan, check_disjoint, run_pipeline
from test_pipeline import config, processes_of, run_and_kill


def stamp(path, text, seconds=0.0):
    """Sleep, then write `text` and the finishing time to `path` (what a job does here)."""
    print(f"job writes {path}")
    time.sleep(seconds)
    with open(path, "w") as f:
        f.write(f"{text} {time.time()} {os.getpid()}")


def fail(message):
    raise DriftError(message)


def finished_at(path):
    return float(path.read_text().split()[1])


def test_jobs_run_after_what_they_read_and_log_to_their_own_files(tmp_path):
    logs = tmp_path / "logs"
    graph = [Job("a", (), stamp, (str(tmp_path / "a"), "A", 1.0), logs / "a.log"),
             Job("b", ("a",), stamp, (str(tmp_path / "b"), "B"), logs / "b.log"),
             Job("c", ("before",), stamp, (str(tmp_path / "c"), "C"), logs / "c.log")]
    run_jobs(graph, 2, {"before"})
    assert finished_at(tmp_path / "b") > finished_at(tmp_path / "a")
    pid = {x: (tmp_path / x).read_text().split()[2] for x in "abc"}
    assert pid["c"] != pid["a"]  # c was ready with a: it ran beside it, in the other worker
    assert len(set(pid.values())) == 2 and str(os.getpid()) not in pid.values()  # two workers, not this process
    assert (logs / "b.log").read_text() == f"job writes {tmp_path / 'b'}\n"


def test_the_job_with_most_work_behind_it_starts_first(tmp_path):
    logs = tmp_path / "logs"
    job = lambda name, after=(): Job(name, after, stamp, (str(tmp_path / name), name), logs / f"{name}.log")  # noqa: E731
    run_jobs([job("side"), job("head"), job("next", ("head",)), job("last", ("next",))], 1, set())
    order = sorted("side head next last".split(), key=lambda n: finished_at(tmp_path / n))
    assert order == ["head", "next", "side", "last"]  # one worker; plan order alone would start with "side"


def test_the_first_failure_stops_the_others_and_names_its_log(tmp_path):
    logs = tmp_path / "logs"
    graph = [Job("slow", (), stamp, (str(tmp_path / "slow"), "S", 60.0), logs / "slow.log"),
             Job("bad", (), fail, ("the checker is gone",), logs / "bad.log"),
             Job("later", ("bad",), stamp, (str(tmp_path / "later"), "L"), logs / "later.log")]
    t0 = time.monotonic()
    with pytest.raises(DriftError, match=r"the checker is gone \(log: .*bad.log\)"):
        run_jobs(graph, 2, set())
    assert time.monotonic() - t0 < 50  # the slow job was stopped, not waited for
    assert not (tmp_path / "slow").exists() and not (tmp_path / "later").exists()


def test_a_graph_that_reads_unknown_work_is_refused(tmp_path):
    with pytest.raises(ValueError, match="neither finished nor in the graph"):
        run_jobs([Job("a", ("ghost",), stamp, (str(tmp_path / "a"), "A"), tmp_path / "a.log")], 2, set())


def test_steps_read_from_the_steps_that_make_their_inputs(tmp_path, tiny_model_dir):
    data = config(tmp_path, tiny_model_dir, arms={"drift": {"method": "drift", "rounds": 2, "round_data": "union"},
                                                   "rft": {"method": "rft"}})
    cfg = build(RunConfig, data)
    after = {s.name: s.after for s in plan(cfg, *check_disjoint(cfg))}
    assert after == {
        "rollout": (), "eval/base": (),
        "weights/drift": ("rollout",), "train/drift": ("weights/drift",), "eval/drift/round-1": ("train/drift",),
        "rollout/drift/round-2": ("train/drift",), "weights/drift/round-2": ("rollout/drift/round-2",),
        "weights/drift/round-2/union": ("weights/drift", "weights/drift/round-2"),
        "train/drift/round-2": ("weights/drift/round-2/union",), "eval/drift": ("train/drift/round-2",),
        "weights/rft": ("rollout",), "train/rft": ("weights/rft",), "eval/rft": ("train/rft",)}


def test_a_run_on_two_worker_processes_equals_the_serial_run(tmp_path, tiny_model_dir):
    f32 = {"dtype": "float32"}  # the workers are spawned: the test's cpuinfo patch does not reach them
    runs = {}
    for jobs in (1, 2):
        data = config(tmp_path / str(jobs), tiny_model_dir,
                      arms={"drift": {"method": "drift", "rounds": 2, "train": {"min_weight": 0.0}},
                            "sft": {"method": "sft"}}, jobs=jobs)
        data["rollout"] = {**data["rollout"], **f32}
        data["eval"] = {**data["eval"], **f32}
        data["train"] = {**data["train"], **f32}
        runs[jobs] = tmp_path / str(jobs) / "run"
        run_pipeline(build(RunConfig, data))
    read = lambda run, f: json.loads((run / f).read_text())  # noqa: E731
    for f in ("eval/base/metrics.json", "eval/sft/metrics.json", "rounds/drift/round-1/eval/metrics.json",
              "eval/drift/metrics.json"):
        assert read(runs[2], f)["succ_at_k"] == read(runs[1], f)["succ_at_k"], f
    for f in ("train/drift/train_summary.json", "rounds/drift/round-2/train/train_summary.json"):
        assert read(runs[2], f)["final_loss"] == pytest.approx(read(runs[1], f)["final_loss"], rel=1e-4), f
    logs = sorted(p.name for p in (runs[2] / "logs").iterdir())
    assert logs == sorted(["rollout.log", "eval-base.log", "weights-drift.log", "train-drift.log",
                           "eval-drift-round-1.log", "rollout-drift-round-2.log", "weights-drift-round-2.log",
                           "train-drift-round-2.log", "eval-drift.log", "weights-sft.log", "train-sft.log",
                           "eval-sft.log"])
    assert "rollout:" in (runs[2] / "logs/rollout.log").read_text()  # the stage's progress bar went to its log
    assert not (runs[1] / "logs").exists()


def test_sigkill_of_the_run_ends_its_workers_and_the_rerun_finishes(tmp_path, tiny_model_dir):
    data = config(tmp_path, tiny_model_dir, arms={"drift": {"method": "drift"}}, jobs=2)
    data["train"] = {**data["train"], "epochs": 20, "save_steps": 2, "logging_steps": 1}
    summary = tmp_path / "run/train/drift/train_summary.json"
    rerun = run_and_kill(tmp_path, data, lambda: any(summary.parent.glob("checkpoint-*/drift_checkpoint.json")))
    deadline = time.monotonic() + 30
    while processes_of(tmp_path) and time.monotonic() < deadline:  # the workers notice their parent is gone
        time.sleep(0.05)
    assert not processes_of(tmp_path), "worker processes outlived the killed run"
    assert json.loads(summary.read_text())["status"] == "running"
    done = rerun()
    assert done.returncode == 0, done.stderr[-2000:]
    final = json.loads(summary.read_text())
    assert final["status"] == "complete" and final["resumed_from"] is not None and final["steps"] == 20 * 3
