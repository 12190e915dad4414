"""The hub's small typed pieces: step names, arm names, mismatch kinds, weighted rows, environment keys."""

import dataclasses
import json

import pytest

from drift import DriftError
from drift.arms import ArmConfig, OfflineArm, OnlineArm, StepId, check_arm_name, make_arm
from drift.config import build
from drift.env import ENVIRONMENT_KEYS, EnvConfig
from drift.pipeline import RunConfig
from drift.records import RowError, WeightedRow
from drift.rollout.engine import RolloutConfig
from drift.rundir import mismatch, mismatches

NAMES = ["rollout", "rollout/drift/round-2", "weights/drift", "weights/drift/round-2", "weights/drift/round-3/union",
         "train/drift", "train/rft-iter/round-2", "online/grpo", "eval/base", "eval/drift/round-1", "eval/drift"]


@pytest.mark.parametrize("name", NAMES)
def test_step_names_round_trip(name):
    assert str(StepId.parse(name)) == name


def test_step_ids_build_the_names_the_run_directory_has_always_used():
    assert str(StepId("eval", "drift", 2)) == "eval/drift/round-2"
    assert str(StepId("weights", "drift", 2, "union")) == "weights/drift/round-2/union"
    assert StepId.parse("weights/drift/round-2/union") == StepId("weights", "drift", 2, "union")
    assert StepId.parse("online/x") == StepId("online", "x") and StepId("online", "x").pipeline_stage == "train"
    assert StepId.parse("rollout") == StepId("rollout") and StepId.parse("rollout").arm is None
    for bad in ("report", "eval/a/round-2/union/more", "weights/a/b/c"):
        with pytest.raises(DriftError, match="not a step name"):
            StepId.parse(bad)


@pytest.mark.parametrize("name", ["a/b", "", "-x", "a b", "drift@2", "base"])
def test_bad_arm_names_fail_in_one_line(name):
    with pytest.raises(DriftError) as e:
        check_arm_name(name)
    assert "\n" not in str(e.value)
    with pytest.raises(DriftError):  # the run config refuses it before it builds anything
        build(RunConfig, {"model": "/nonexistent", "arms": {name: {"method": "sft"}}})


def test_good_arm_names_and_kinds():
    for name in ("drift", "rft-iter", "drift_auto", "v1.2"):
        assert check_arm_name(name) == name
    assert isinstance(make_arm("x", ArmConfig(method="swift")), OfflineArm)
    assert isinstance(make_arm("x", ArmConfig(method="online")), OnlineArm)
    with pytest.raises(DriftError, match="arms.x.method"):
        make_arm("x", ArmConfig(method="dpo"))


def test_arm_cost_counts_its_own_steps_and_the_shared_rollout():
    recs = {"rollout": {"cost": {"generated_tokens": 1}}, "weights/d": {"cost": {"generated_tokens": 2}},
            "train/d": {"cost": {"generated_tokens": 4}}, "eval/d/round-1": {"cost": {"generated_tokens": 100}},
            "rollout/d/round-2": {"cost": {"generated_tokens": 8}}, "train/d/round-2": {"cost": {"generated_tokens": 16}},
            "eval/d": {"cost": {"generated_tokens": 100}}, "online/o": {"cost": {"generated_tokens": 32}},
            "eval/o": {"cost": {"generated_tokens": 100}}}
    d = make_arm("d", ArmConfig(method="drift", rounds=2))
    assert d.cost(recs).generated_tokens == 1 + 2 + 4 + 8 + 16 and d.cost(recs, 1).generated_tokens == 1 + 2 + 4
    assert make_arm("o", ArmConfig(method="online")).cost(recs).generated_tokens == 32  # not the shared rollout
    assert [(r.label, r.step, r.round) for r in d.rows(recs)] == [("d@1", "eval/d/round-1", 1), ("d@2", "eval/d", 2)]


def test_an_online_arm_labels_the_points_of_its_learning_curve():
    o = make_arm("o", ArmConfig(method="online"))
    curve = [{"iteration": 10, "metrics": "evals/00010"}, {"iteration": 30, "metrics": "evals/00030"}]
    assert o.curve({"online/o": {"curve": curve}}) == curve and o.curve({}) == []
    assert [o.curve_label(p) for p in curve] == ["o@10", "o@30"]  # docs/tables.py's rows of a stopped arm


def test_mismatch_kinds_are_data():
    old = {"settings": {"lr": 1e-4, "model": "trained:abc", "seed": 0}, "input": {"digest": "x"}}
    new = {"settings": {"lr": 2e-4, "model": "trained:def", "seed": 0}, "input": {"digest": "y"}}
    kinds = [(m.kind, m.text.split(":")[0]) for m in mismatches(old, new)]
    assert kinds == [("setting", "lr"), ("model", "model"), ("input", "input")]
    assert mismatch(old, new) == [m.text for m in mismatches(old, new)]
    plain = {"settings": {"model": "smollm2-135m"}}  # another base model is the stage's own setting
    assert [m.kind for m in mismatches(plain, {"settings": {"model": "other"}})] == ["setting"]
    assert mismatches(old, old) == []


def test_weighted_row_validates_and_keeps_its_json_form():
    row = {"prompt_id": "p", "sample_idx": 0, "messages": [{"role": "user", "content": "q"},
                                                          {"role": "assistant", "content": "a"}]}
    w = WeightedRow(row, 0.5, 0.9)
    assert list(w.to_json()) == ["prompt_id", "sample_idx", "messages", "return", "weight"]
    back = WeightedRow.from_json(json.loads(json.dumps(w.to_json())))
    assert back.to_json() == w.to_json() and back.weight == 0.5 and back.ret == 0.9
    for bad, reason in [({**row}, "weight_missing"), ({**row, "weight": "1"}, "weight_invalid"),
                        ({**row, "weight": True}, "weight_invalid"), ({**row, "weight": float("nan")}, "weight_invalid"),
                        ({**row, "weight": -1.0}, "weight_negative"), ({"weight": 1.0}, "messages_invalid"),
                        ({"weight": 1.0, "messages": [{"role": "user"}]}, "messages_invalid")]:
        with pytest.raises(RowError) as e:
            WeightedRow.from_json(bad)
        assert e.value.reason == reason
    assert WeightedRow.from_json({**row, "weight": -1.0}, allow_negative=True).weight == -1.0


def test_environment_keys_are_config_fields():
    rollout = {f.name for f in dataclasses.fields(RolloutConfig)}
    assert set(ENVIRONMENT_KEYS) <= rollout
    assert set(ENVIRONMENT_KEYS) | {"check_workers"} == {f.name for f in dataclasses.fields(EnvConfig)} | {"checker"}
