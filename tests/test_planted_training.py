"""Correction contexts for training: a rollout planted with wrong first answers (`planted`), their
weights among the continuations of the same mistake, training that never trains a planted answer,
and the offline arm that adds them (`arms.X.planted`)."""

from __future__ import annotations

import json

import pytest

from drift import DriftError
from drift.config import build
from drift.pipeline import RunConfig, run_pipeline
from drift.records import read_trajectories, write_jsonl
from drift.rollout import RolloutConfig, read_manifest, run_rollout
from drift.tasks import TaskSpec, load_tasks
from drift.train.data import tokenize_row
from drift.weights import WeightsConfig, compute
from test_evaluate import ScriptedBackend, problems


def rollout(tmp_path, name, script, **kw):
    cfg = RolloutConfig(model="scripted", output=str(tmp_path / name), n=3, max_turns=3, **kw)
    return run_rollout(cfg, problems=problems(), backend=ScriptedBackend(script))


def first_rollout(tmp_path):
    """Turn 1 by sample: P1 always right (nothing to plant); the others "6", "6", "9": "6" is planted."""
    return rollout(tmp_path, "r1", lambda conv, turn: "4" if conv[0] == "P1" else ("9" if conv[1] == 2 else "6"))


def test_a_rollout_continues_the_most_frequent_wrong_first_answer(tmp_path):
    source = first_rollout(tmp_path)
    # after the planted answer: sample 0 corrects itself, sample 1 repeats it, sample 2 tries 7 then 4
    after = {0: ["4"], 1: ["6", "6"], 2: ["7", "4"]}
    manifest = rollout(tmp_path, "p", lambda conv, turn: after[conv[1]][turn - 2], planted=str(tmp_path / "r1"))
    trajs = sorted(read_trajectories(tmp_path / "p" / "trajectories"), key=lambda t: t.key)
    assert {t.prompt_id for t in trajs} == {"P2", "P3", "P4", "P5"}  # P1: never wrong, left out
    assert all(t.metadata["planted"] and t.turns[0].answer_norm == "6" and t.turns[0].status == "wrong" for t in trajs)
    assert [t.success_turn for t in trajs if t.prompt_id == "P2"] == [2, None, 3]
    assert [len(t.turns) for t in trajs if t.prompt_id == "P2"] == [2, 3, 3]
    assert manifest["settings"]["planted_from"] == source["digest"]
    # the same command resumes; planted answers from another rollout are other settings
    rollout(tmp_path, "p", lambda conv, turn: after[conv[1]][turn - 2], planted=str(tmp_path / "r1"), resume=True)
    rollout(tmp_path, "r2", lambda conv, turn: "5", seed=1)  # another rollout: other settings, another digest
    with pytest.raises(DriftError, match="planted_from"):
        rollout(tmp_path, "p", lambda conv, turn: "4", planted=str(tmp_path / "r2"), resume=True)


def test_planted_answers_from_a_file_and_bad_sources(tmp_path):
    f = tmp_path / "planted.jsonl"
    write_jsonl(f, [{"prompt_id": "P3", "response": "It is 3."}])
    manifest = rollout(tmp_path, "p", lambda conv, turn: "4", planted=str(f))
    assert read_manifest(tmp_path / "p")["summary"]["num_trajectories"] == 3  # one problem x n
    assert len(manifest["settings"]["planted_from"]) == 16
    with pytest.raises(DriftError, match="neither a planted.jsonl"):
        rollout(tmp_path, "q", lambda conv, turn: "4", planted=str(tmp_path / "missing"))
    rollout(tmp_path, "never-wrong", lambda conv, turn: "4")
    with pytest.raises(DriftError, match="no planted answer for any"):
        rollout(tmp_path, "q", lambda conv, turn: "4", planted=str(tmp_path / "never-wrong"))


def planted_row(idx, answers, success_turn):
    turns = [{"response": a, "answer": a, "answer_norm": a, "tokens": 1, "finish_reason": "stop",
              "status": "correct" if a == "4" else "wrong"} for a in answers]
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    for k, a in enumerate(answers):
        messages += [{"role": "assistant", "content": a}] + (
            [{"role": "user", "content": "Incorrect. Please think again."}] if k < len(answers) - 1 else [])
    return {"prompt_id": "P", "sample_idx": idx, "messages": messages, "turns": turns, "gold": "4",
            "success_turn": success_turn, "metadata": {"planted": True}, "schema_version": 1}


def test_continuations_of_the_same_mistake_are_weighted_among_themselves(tmp_path):
    # planted "6" (gold 4), then: a) 4: 0.9; b) 7, 4: 0.81; c) 6, 6: -0.5 * (1 - 1/3) = -1/3; d) 7, 8: 0
    rows = [planted_row(0, ["6", "4"], 2), planted_row(1, ["6", "7", "4"], 3), planted_row(2, ["6", "6", "6"], None),
            planted_row(3, ["6", "7", "8"], None)]
    write_jsonl(tmp_path / "t.jsonl", rows)
    out, _ = compute(WeightsConfig(input=str(tmp_path / "t.jsonl"), method="drift", beta=0.1, gamma=0.9))
    # w_i = exp(R_i / 0.1) / mean_j exp(R_j / 0.1): e^9, e^8.1, e^-3.33, e^0 over their mean 2849.65
    assert [r.ret for r in out] == pytest.approx([0.9, 0.81, -1 / 3, 0.0])
    assert [r.weight for r in out] == pytest.approx([2.8435396, 1.1560969, 1.2518742e-05, 3.5092067e-04], rel=1e-6)


def test_a_planted_answer_is_never_trained(tiny_tokenizer):
    row = planted_row(1, ["6", "7", "4"], 3)
    ids, mask, _ = tokenize_row(row, tiny_tokenizer, "all")
    trained = tiny_tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert trained == "7<|im_end|>4<|im_end|>"  # turns 2 and 3, not the planted 6
    row["metadata"] = {}
    ids, mask, _ = tokenize_row(row, tiny_tokenizer, "all")
    assert tiny_tokenizer.decode([t for t, m in zip(ids, mask) if m]) == "6<|im_end|>7<|im_end|>4<|im_end|>"
    ids, mask, _ = tokenize_row(planted_row(1, ["6", "4"], 2), tiny_tokenizer, "last")
    assert tiny_tokenizer.decode([t for t, m in zip(ids, mask) if m]) == "4<|im_end|>"


# --- the offline arm with correction contexts, end to end on a tiny model ----------------------

def run_config(tmp_path, model_dir, **arm):
    return {"output": str(tmp_path / "run"), "model": str(model_dir),
            "rollout": {"tasks": "mul", "split": "train", "num_problems": 3, "n": 2, "max_turns": 3, "max_new_tokens": 4},
            "train": {"epochs": 1, "batch_size": 2, "lr": 1e-4, "min_weight": 0.0},
            "eval": {"tasks": "mul", "split": "test", "num_problems": 2, "max_turns": 2, "max_new_tokens": 4},
            "arms": {"dc": {"method": "drift", **arm}}}


@pytest.fixture
def scripted_mul(monkeypatch):
    """Every model answers mul from a script: turn 1 wrong ("1") for sample 0, right for sample 1;
    later turns right. Training still runs on the tiny model."""
    import drift.rollout.engine as engine

    gold = {p.id: p.answer for split in ("train", "test")
            for p in load_tasks(TaskSpec(tasks="mul", split=split, num_problems=3))}
    script = lambda conv, turn: "1" if turn == 1 and conv[1] == 0 else gold[conv[0]]  # noqa: E731
    monkeypatch.setattr(engine, "make_backend", lambda cfg, model_path=None: ScriptedBackend(script))


def test_the_offline_arm_trains_on_its_correction_contexts(tmp_path, tiny_model_dir, scripted_mul, capsys):
    cfg = build(RunConfig, run_config(tmp_path, tiny_model_dir, planted=True))
    run_pipeline(cfg)
    run = tmp_path / "run"
    round1 = run / "rounds" / "dc" / "round-1"
    planted = read_trajectories(round1 / "planted-rollout" / "trajectories")
    # every training fact had a wrong first answer ("1", sample 0): 3 facts x n = 2 continuations, right at turn 2
    assert len(planted) == 6 and all(t.metadata["planted"] and t.success_turn == 2 for t in planted)
    parts = sorted(p.name for p in (round1 / "union.jsonl").iterdir() if p.suffix == ".jsonl")
    assert parts == ["part-001.jsonl", "part-002.jsonl"]
    summary = json.loads((run / "train" / "dc" / "train_summary.json").read_text())
    assert summary["config"]["data"] == str(round1 / "union.jsonl")
    assert summary["data"]["rows_used"] == 12  # the shared rollout's 6 rows and the 6 planted ones
    report = (run / "report.md").read_text()
    assert "| dc (drift) |" in report
    steps = json.loads((run / "config.json").read_text())
    assert steps["arms"]["dc"]["planted"] is True
    # everything complete: a rerun does nothing; turning planted off changes the plan, named
    stamp = (run / "train" / "dc" / "train_summary.json").stat().st_mtime_ns
    run_pipeline(cfg)
    assert (run / "train" / "dc" / "train_summary.json").stat().st_mtime_ns == stamp
    with pytest.raises(DriftError, match=r"arms\.dc\.planted"):
        run_pipeline(build(RunConfig, run_config(tmp_path, tiny_model_dir, planted=False)))


def test_planted_needs_an_offline_arm_and_two_turns(tmp_path, tiny_model_dir):
    with pytest.raises(DriftError, match="planted applies to offline arms"):
        build(RunConfig, {**run_config(tmp_path, tiny_model_dir), "arms": {"o": {"method": "online", "planted": True}}})
    data = run_config(tmp_path, tiny_model_dir, planted=True)
    data["rollout"]["max_turns"] = 1
    with pytest.raises(DriftError, match="max_turns >= 2"):
        build(RunConfig, data).arms["dc"]  # noqa: B018


def test_planted_n_sets_the_continuations_per_planted_answer(tmp_path, tiny_model_dir):
    run = build(RunConfig, run_config(tmp_path, tiny_model_dir, planted=True, planted_n=5))
    arm = run.arm("dc")
    rc, w, _ = arm.stage_configs(run, 1)
    prc, _ = arm.planted_configs(run, 1, rc, w)
    assert (rc.n, prc.n) == (2, 5)  # the shared rollout keeps its n
    unset = build(RunConfig, run_config(tmp_path, tiny_model_dir, planted=True)).arm("dc")
    assert unset.planted_configs(run, 1, rc, w)[0].n == 2
    for bad in ({"planted_n": 4}, {"planted": True, "planted_n": 0}):
        with pytest.raises(DriftError, match="planted_n"):
            build(RunConfig, run_config(tmp_path, tiny_model_dir, **bad))
