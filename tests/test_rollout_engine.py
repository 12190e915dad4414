"""The rollout engine: loop logic with a scripted backend, resume, bad input, the real hf backend, SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from drift import DriftError
from drift.checkers import Checker
from drift.config import derive_seed
from drift.records import read_trajectories
from drift.rollout import BackendStats, GenOutput, PromptTooLong, RolloutConfig, is_complete, read_manifest, run_rollout
from drift.rollout.protocol import sample_seed
from drift.tasks import Problem

SRC = Path(__file__).resolve().parents[1] / "src"


def problems(k: int = 3) -> list[Problem]:
    return [Problem(id=f"p{j}", question=f"What is {j} + 7?", answer=str(j + 7), checker="numeric", extract="number")
            for j in range(k)]


class ScriptedBackend:
    """Sample i of every prompt answers correctly at turn i + 1 (never if i + 1 > max_turns); wrong
    answers are 100 + turn (so they differ across turns). Records every call."""

    name = "scripted"

    def __init__(self, problems: list[Problem], fail_after: int | None = None,
                 too_long: dict[str, int] | None = None):
        self.gold = {p.id: p.answer for p in problems}
        self.fail_after = fail_after  # raise after this many successful calls
        self.too_long = too_long or {}  # prompt_id -> turn at which its history no longer fits
        self.calls: list[list[tuple[list, int, int]]] = []  # per call: (conv_ids, turn, len(messages))
        self.released: list = []
        self.stats = BackendStats()

    def generate(self, requests, params):
        self.refuse_too_long(requests)
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("backend crashed")
        self.calls.append([(list(r.conv_ids), r.turn, len(r.messages)) for r in requests])
        return [[self.answer(conv, r.turn) for conv in r.conv_ids] for r in requests]

    def refuse_too_long(self, requests):
        bad = [c for r in requests for c in r.conv_ids if self.too_long.get(c[0]) == r.turn]
        if bad:
            raise PromptTooLong(bad, "scripted")

    def answer(self, conv, turn):
        self.stats.generated_tokens += 3
        return GenOutput(text=self.gold[conv[0]] if conv[1] + 1 == turn else str(100 + turn), tokens=3,
                         finish_reason="stop")

    def release(self, conv_ids):
        self.released += conv_ids

    def close(self):
        pass


class StreamingScriptedBackend(ScriptedBackend):
    """The scripted answers through a stream: each poll answers the `per_poll` conversations
    submitted first. `calls` records the submits; `fail_after` counts polls."""

    def __init__(self, problems: list[Problem], per_poll: int = 2, **kw):
        super().__init__(problems, **kw)
        self.per_poll = per_poll
        self.polls: list[list] = []  # per poll: the conversations answered
        self.most_in_flight = 0

    def stream(self, params):
        return ScriptedStream(self)


class ScriptedStream:
    def __init__(self, backend: StreamingScriptedBackend):
        self.b, self.queue = backend, []

    def submit(self, requests):
        self.b.refuse_too_long(requests)
        self.b.calls.append([(list(r.conv_ids), r.turn, len(r.messages)) for r in requests])
        self.queue += [(conv, r.turn) for r in requests for conv in r.conv_ids]
        self.b.most_in_flight = max(self.b.most_in_flight, len(self.queue))

    def poll(self):
        if self.b.fail_after is not None and len(self.b.polls) >= self.b.fail_after:
            raise RuntimeError("backend crashed")
        answered, self.queue = self.queue[: self.b.per_poll], self.queue[self.b.per_poll :]
        if answered:
            self.b.polls.append([conv for conv, _ in answered])
        return [(conv, self.b.answer(conv, turn)) for conv, turn in answered]


BACKENDS = [ScriptedBackend, StreamingScriptedBackend]


def config(tmp_path: Path, **kw) -> RolloutConfig:
    base = dict(output=str(tmp_path / "run"), n=4, max_turns=3, shard_size=5, system_prompt="sys", seed=1)
    return RolloutConfig(**{**base, **kw})


def shard_rows(out: Path) -> list[dict]:
    return [json.loads(line) for f in sorted((out / "trajectories").glob("*.jsonl")) for line in f.read_text().splitlines()]


def test_loop_continues_only_live_conversations(tmp_path):
    probs = problems(3)
    backend = ScriptedBackend(probs)
    cfg = config(tmp_path)
    manifest = run_rollout(cfg, probs, backend)
    # max_live defaults to max(n, 4 * batch_size) = 64: all three groups start in the first call
    first, second, third = backend.calls
    assert [(ids, turn, m) for ids, turn, m in first] == [([(p.id, i) for i in range(4)], 1, 2) for p in probs]
    # turn 2: samples 1, 2, 3 of each prompt, one request each, history = sys, user, assistant, feedback
    assert sorted(ids[0] for ids, _, _ in second) == sorted((p.id, i) for p in probs for i in (1, 2, 3))
    assert all(len(ids) == 1 and turn == 2 and m == 4 for ids, turn, m in second)
    assert sorted(ids[0] for ids, _, _ in third) == sorted((p.id, i) for p in probs for i in (2, 3))
    assert all(turn == 3 and m == 6 for _, turn, m in third)
    assert sorted(backend.released) == sorted((p.id, i) for p in probs for i in range(4))

    rows = shard_rows(Path(cfg.output))
    assert len(rows) == 12 and len({(r["prompt_id"], r["sample_idx"]) for r in rows}) == 12
    assert [len(f.read_text().splitlines()) for f in sorted((Path(cfg.output) / "trajectories").glob("*"))] == [5, 5, 2]
    by_key = {(r["prompt_id"], r["sample_idx"]): r for r in rows}
    assert [len(by_key[("p0", i)]["turns"]) for i in range(4)] == [1, 2, 3, 3]
    assert [by_key[("p0", i)]["success_turn"] for i in range(4)] == [1, 2, 3, None]
    assert [m["role"] for m in by_key[("p0", 3)]["messages"]] == ["system", "user"] + ["assistant", "user"] * 2 + ["assistant"]

    assert manifest["status"] == "complete" and is_complete(cfg.output)
    assert read_manifest(cfg.output) == json.loads(json.dumps(manifest))
    assert manifest["counts"] == {"problems": 3, "expected": 12, "written": 12, "skipped": 0}
    assert manifest["sampling"]["temperature"] == 1.0 and manifest["sampling"]["n"] == 4
    assert manifest["env"]["max_turns"] == 3 and manifest["task"]["tasks"] == "mc-arith"
    s = manifest["summary"]
    assert s["succ_at_k"] == [0.25, 0.5, 0.75]
    assert s["attempted"] == [12, 9, 6] and s["correct"] == [3, 3, 3]
    assert s["cond_acc"] == pytest.approx([1 / 4, 1 / 3, 1 / 2])
    assert s["unique_ratio"] == 1.0  # the scripted wrong answers differ per turn
    assert s["total_tokens"] == 3 * (12 + 9 + 6)


def test_max_live_admits_groups_as_others_finish(tmp_path):
    probs = problems(5)
    backend = ScriptedBackend(probs)
    run_rollout(config(tmp_path, max_live=8), probs, backend)
    sizes = [sum(len(ids) for ids, _, _ in call) for call in backend.calls]
    assert max(sizes) <= 8
    # a new group joins turn-2/3 conversations of earlier groups in one call
    assert any({turn for _, turn, _ in call} == {1, 2} for call in backend.calls)
    assert len(shard_rows(tmp_path / "run")) == 20


def log_checks(monkeypatch) -> list[str]:
    """Record each answer check's submission ("submit") and wait ("wait"), in order."""
    events = []
    submit = Checker.submit

    def logged_submit(self, response, gold):
        pending = submit(self, response, gold)
        result = pending.result
        pending.result = lambda: events.append("wait") or result()
        events.append("submit")
        return pending

    monkeypatch.setattr(Checker, "submit", logged_submit)
    return events


def test_each_call_is_checked_in_one_batch(tmp_path, monkeypatch):
    events = log_checks(monkeypatch)
    probs = problems(3)
    run_rollout(config(tmp_path), probs, ScriptedBackend(probs))
    # the calls carry 12, 9 and 6 responses: all checks of a call are under way before the first is awaited
    assert events == ["submit"] * 12 + ["wait"] * 12 + ["submit"] * 9 + ["wait"] * 9 + ["submit"] * 6 + ["wait"] * 6


def test_streamed_loop_judges_each_answer_as_it_comes(tmp_path, monkeypatch):
    events = log_checks(monkeypatch)
    probs = problems(3)
    by_turn, streamed = ScriptedBackend(probs), StreamingScriptedBackend(probs, per_poll=2)
    run_rollout(config(tmp_path, output=str(tmp_path / "by-turn")), probs, by_turn)
    events.clear()
    manifest = run_rollout(config(tmp_path), probs, streamed)
    # 27 answers, two per poll, each poll's answers checked together
    assert [len(p) for p in streamed.polls] == [2] * 13 + [1]
    assert events == ["submit", "submit", "wait", "wait"] * 13 + ["submit", "wait"]
    # a turn-2 request goes into the stream before the last turn-1 answer is out
    turns = [turn for call in streamed.calls for _, turn, _ in call]
    assert turns.index(2) < len(streamed.calls) - 1 and sum(t == 1 for t in turns) == 3
    assert sorted(streamed.released) == sorted(by_turn.released)
    canon = lambda rs: sorted(json.dumps(r, sort_keys=True) for r in rs)  # noqa: E731
    assert canon(shard_rows(tmp_path / "run")) == canon(shard_rows(tmp_path / "by-turn"))
    assert manifest["counts"]["written"] == 12 and manifest["cost"]["generated_tokens"] == 3 * 27


def test_streamed_loop_admits_groups_under_max_live(tmp_path):
    probs = problems(5)
    backend = StreamingScriptedBackend(probs, per_poll=1)
    run_rollout(config(tmp_path, max_live=8), probs, backend)
    assert backend.most_in_flight <= 8
    turns = [turn for call in backend.calls for _, turn, _ in call]
    assert turns[:2] == [1, 1] and turns.index(2) < max(i for i, t in enumerate(turns) if t == 1)  # groups join later
    assert len(shard_rows(tmp_path / "run")) == 20 and len(backend.released) == 20


@pytest.mark.parametrize("workers,most", [(1, 8), (2, 16)])
def test_default_max_live_grows_with_the_workers(tmp_path, workers, most):
    """max(n, 4 x batch_size x workers): each worker keeps as many conversations as one process."""
    probs = problems(6)  # 24 conversations of n = 4
    backend = StreamingScriptedBackend(probs, per_poll=1)
    run_rollout(config(tmp_path, batch_size=2, workers=workers), probs, backend)
    assert backend.most_in_flight == most


def test_stream_turns_false_keeps_one_call_per_turn(tmp_path):
    probs = problems(3)
    backend = StreamingScriptedBackend(probs)
    run_rollout(config(tmp_path, stream_turns=False), probs, backend)
    assert backend.polls == [] and len(backend.calls) == 3  # generate(), once per turn


@pytest.mark.parametrize("backend_class", BACKENDS)
def test_progress_counts_every_prompt_once(tmp_path, monkeypatch, backend_class):
    import tqdm.auto

    bars = []

    class Bar:
        def __init__(self, total, **kw):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def set_postfix(self, **kw):
            self.postfix = kw

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    probs = problems(4)
    run_rollout(config(tmp_path), probs, backend_class(probs, too_long={"p1": 1, "p2": 2}))
    (bar,) = bars
    assert bar.total == bar.n == 4 and bar.postfix["skipped"] == 7 and bar.postfix["live"] == 0


def test_unreadable_gold_stops_the_rollout_before_sampling(tmp_path):
    probs = problems(2) + [Problem(id="odd", question="?", answer="???", checker="math")]
    backend = ScriptedBackend(probs)
    with pytest.raises(DriftError, match=r"problem 'odd': math checker: math-verify cannot parse the gold answer"):
        run_rollout(config(tmp_path), probs, backend)
    assert backend.calls == [] and not (tmp_path / "run").exists()


@pytest.mark.parametrize("backend_class", BACKENDS)
def test_prompt_too_long_is_a_counted_skip(tmp_path, caplog, backend_class):
    probs = problems(3)
    backend = backend_class(probs, too_long={"p1": 1, "p2": 2})
    manifest = run_rollout(config(tmp_path), probs, backend)
    keys = {(r["prompt_id"], r["sample_idx"]) for r in shard_rows(tmp_path / "run")}
    # p1 never starts; p2 sample 0 finished at turn 1, its other samples are dropped at turn 2
    assert keys == {("p0", i) for i in range(4)} | {("p2", 0)}
    assert manifest["counts"] == {"problems": 3, "expected": 12, "written": 5, "skipped": 7}
    assert {(s["prompt_id"], s["turn"]) for s in manifest["skipped"]} == {("p1", 1), ("p2", 2)}
    assert "exceeds the model context" in caplog.text
    assert ("p2", 3) in backend.released


def test_all_skipped_is_an_error(tmp_path):
    probs = problems(1)
    with pytest.raises(DriftError, match="no trajectories"):
        run_rollout(config(tmp_path), probs, ScriptedBackend(probs, too_long={"p0": 1}))
    assert not is_complete(tmp_path / "run")


@pytest.mark.parametrize("backend_class", BACKENDS)
def test_crash_then_resume_gives_every_trajectory_once(tmp_path, backend_class):
    probs = problems(4)
    reference = tmp_path / "reference"
    run_rollout(config(tmp_path, output=str(reference), max_live=4), probs, ScriptedBackend(probs))

    cfg = config(tmp_path, max_live=4)
    with pytest.raises(RuntimeError, match="crashed"):
        run_rollout(cfg, probs, backend_class(probs, fail_after=4))
    out = Path(cfg.output)
    partial = shard_rows(out)
    assert 0 < len(partial) < 16 and not is_complete(out)
    assert read_manifest(out)["status"] == "running"
    shards = sorted((out / "trajectories").glob("*.jsonl"))
    with shards[-1].open("a") as f:
        f.write('{"prompt_id": "p3", "sample_idx": 1, "mess')  # a write torn by a kill

    with pytest.raises(DriftError, match="not empty: pass --resume"):
        run_rollout(cfg, probs, ScriptedBackend(probs))
    backend = backend_class(probs)
    manifest = run_rollout(config(tmp_path, max_live=4, resume=True), probs, backend)
    rows = shard_rows(out)
    keys = [(r["prompt_id"], r["sample_idx"]) for r in rows]
    assert len(keys) == len(set(keys)) == 16
    done_before = {(r["prompt_id"], r["sample_idx"]) for r in partial}
    started = {c for call in backend.calls for ids, turn, _ in call if turn == 1 for c in ids}
    assert started == {(p.id, i) for p in probs for i in range(4)} - done_before  # only the missing samples
    assert manifest["status"] == "complete" and len(manifest["timings"]["sessions"]) == 2
    canon = lambda rs: sorted(json.dumps(r, sort_keys=True) for r in rs)  # noqa: E731
    assert canon(rows) == canon(shard_rows(reference))  # same as an uninterrupted run


def test_resume_refuses_other_settings_or_tasks(tmp_path):
    probs = problems(2)
    run_rollout(config(tmp_path), probs, ScriptedBackend(probs))
    with pytest.raises(DriftError, match="other settings.*temperature: 1.0 -> 0.5"):
        run_rollout(config(tmp_path, resume=True, temperature=0.5), probs, ScriptedBackend(probs))
    with pytest.raises(DriftError, match="max_turns: 3 -> 2"):
        run_rollout(config(tmp_path, resume=True, max_turns=2), probs, ScriptedBackend(probs))
    other = problems(3)
    with pytest.raises(DriftError, match="problems: '[0-9a-f]+' -> '[0-9a-f]+'"):
        run_rollout(config(tmp_path, resume=True), other, ScriptedBackend(other))
    # resuming a complete run changes nothing
    backend = ScriptedBackend(probs)
    manifest = run_rollout(config(tmp_path, resume=True, batch_size=2), probs, backend)
    assert backend.calls == [] and manifest["counts"]["written"] == 8


def test_bad_input_errors(tmp_path):
    with pytest.raises(DriftError, match="output directory"):
        run_rollout(RolloutConfig(output=""), problems(1), ScriptedBackend(problems(1)))
    with pytest.raises(DriftError, match="'top_p' is out of range"):
        RolloutConfig(top_p=0.0)
    with pytest.raises(DriftError, match="max_turns"):
        RolloutConfig(max_turns=0)
    with pytest.raises(DriftError, match="model path not found"):
        run_rollout(config(tmp_path, model=str(tmp_path / "nope/"), output=str(tmp_path / "m")), problems(1))
    assert not (tmp_path / "m").exists()  # a fresh run that failed leaves nothing behind
    with pytest.raises(DriftError, match="LoRA adapters are applied by the vllm backend"):
        config(tmp_path, adapter=str(tmp_path))
    bad = tmp_path / "tasks.jsonl"
    bad.write_text('{"id": "a", "question": "q", "answer": "1"}\n{"id": "b", "question": "q"}\n')
    with pytest.raises(DriftError, match=r"tasks.jsonl:2: missing field 'answer'"):
        run_rollout(config(tmp_path, tasks=str(bad)))
    assert not (tmp_path / "run").exists()


def test_seeds_are_per_sample_and_turn():
    assert sample_seed(0, ("p", 0), 1) != sample_seed(0, ("p", 1), 1) != sample_seed(0, ("p", 1), 2)
    assert sample_seed(0, ("p", 0), 1) == sample_seed(0, ("p", 0), 1) < 2**63


def test_seed_values_are_pinned():
    """The seeds every backend samples with and every random stream of a run starts from: literal
    values, so a change of the recipe (which would change every trajectory) cannot go unnoticed."""
    assert sample_seed(0, ("p", 0), 1) == 2522206245658434023
    assert sample_seed(5, ("mc-arith/17", 3), 2) == 917786866437099981
    assert sample_seed(123456789, ("q", 4), 5) == 5687404340144512217
    assert derive_seed(0, "epoch", 0) == 5708693043793482679
    assert derive_seed(7, "round", 2) == 3094298450272160663
    assert derive_seed(3, "update", 11) == 3787988532469212421


def test_hf_backend_rollout(tmp_path, tiny_model_dir):
    cfg = config(tmp_path, model=str(tiny_model_dir), tasks="arith", num_problems=3, n=2, max_turns=2,
                 max_new_tokens=6, batch_size=4, threads=1)
    manifest = run_rollout(cfg)
    trajs = read_trajectories(Path(cfg.output) / "trajectories")
    assert sorted(t.key for t in trajs) == sorted((p, i) for p in {t.prompt_id for t in trajs} for i in range(2))
    assert len(trajs) == 6 and manifest["backend"] == "hf" and manifest["model_path"] == str(tiny_model_dir)
    for t in trajs:
        assert 1 <= len(t.turns) <= 2 and all(0 < turn.tokens <= 6 for turn in t.turns)
    assert manifest["summary"]["total_tokens"] == sum(turn.tokens for t in trajs for turn in t.turns)
    assert manifest["versions"]["torch"] and manifest["status"] == "complete"


def test_rollout_threads_do_not_outlive_the_stage(tmp_path, tiny_model_dir):
    """A rerun after a crash must train with the thread count an uninterrupted run would have."""
    import torch

    torch.set_num_threads(2)
    try:
        run_rollout(config(tmp_path, model=str(tiny_model_dir), tasks="arith", num_problems=1, n=1, max_turns=1,
                           max_new_tokens=2, threads=1))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_run_rollout_prints_nothing_and_the_cli_prints_the_summary(tmp_path, tiny_model_dir, capsys):
    from drift.cli import main

    probs = problems(2)
    run_rollout(config(tmp_path), probs, ScriptedBackend(probs))
    assert capsys.readouterr().out == ""
    assert main(["rollout", "--model", str(tiny_model_dir), "--tasks", "arith", "--num-problems", "2", "--n", "1",
                 "--max-turns", "1", "--max-new-tokens", "2", "--threads", "1", "--output", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "rollout: " in out and "2 of 2 (0 skipped)" in out  # the summary table


KILL_CONFIG = dict(tasks="arith", num_problems=24, n=3, max_turns=3, max_new_tokens=8, batch_size=4, max_live=6,
                   shard_size=4, system_prompt=None, threads=1)
KILL_SCRIPT = textwrap.dedent(f"""
    import sys, time
    from drift.rollout import RolloutConfig, make_backend, run_rollout
    cfg = RolloutConfig(model=sys.argv[1], output=sys.argv[2], resume=sys.argv[3] == "1", **{KILL_CONFIG!r})
    backend = make_backend(cfg)
    open_stream = backend.stream
    def slow_stream(params):  # slow enough to be killed mid-run
        stream = open_stream(params)
        poll = stream.poll
        stream.poll = lambda: time.sleep(float(sys.argv[4])) or poll()
        return stream
    backend.stream = slow_stream
    run_rollout(cfg, backend=backend)
""")


def test_sigkill_mid_run_then_resume(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    script = tmp_path / "rollout_script.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(tiny_model_dir), str(out), "0", "0.1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if sum(len(f.read_bytes().splitlines()) for f in (out / "trajectories").glob("*.jsonl")) >= 6:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not is_complete(out)
    before = len(shard_rows_tolerant(out))
    assert 6 <= before < 72

    done = subprocess.run([sys.executable, str(script), str(tiny_model_dir), str(out), "1", "0"], env=env,
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    rows = shard_rows(out)
    keys = [(r["prompt_id"], r["sample_idx"]) for r in rows]
    assert len(keys) == len(set(keys)) == 72  # 24 problems x 3 samples, each exactly once
    manifest = read_manifest(out)
    assert manifest["status"] == "complete" and manifest["counts"]["written"] == 72
    assert len(manifest["timings"]["sessions"]) == 2
    # per-(prompt, sample, turn) seeds: the resumed run holds what an uninterrupted run samples
    run_rollout(RolloutConfig(model=str(tiny_model_dir), output=str(tmp_path / "reference"), **KILL_CONFIG))
    canon = lambda rs: sorted(json.dumps(r, sort_keys=True) for r in rs)  # noqa: E731
    assert canon(rows) == canon(shard_rows(tmp_path / "reference"))


def shard_rows_tolerant(out: Path) -> list[str]:
    return [line for f in (out / "trajectories").glob("*.jsonl") for line in f.read_text().splitlines()
            if line.endswith("}")]


def test_a_failure_before_the_first_trajectory_does_not_block_the_corrected_rerun(tmp_path):
    """The model loaded, then generation failed (a config error found late): no "running" manifest
    is left, so the corrected command runs without --resume."""
    probs = problems(2)
    with pytest.raises(RuntimeError, match="backend crashed"):
        run_rollout(config(tmp_path), probs, ScriptedBackend(probs, fail_after=0))
    assert not (tmp_path / "run").exists()
    manifest = run_rollout(config(tmp_path), probs, ScriptedBackend(probs))
    assert manifest["status"] == "complete"


def test_two_writers_on_one_rollout_directory(tmp_path):
    from drift.rundir import Lock

    probs = problems(2)
    (tmp_path / "run").mkdir()
    with Lock(tmp_path / "run"), pytest.raises(DriftError, match="being written by another drift process"):
        run_rollout(config(tmp_path, resume=True), probs, ScriptedBackend(probs))
