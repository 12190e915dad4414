"""Returns and weights against numbers computed by hand (formulas in the comments)."""

import json
import math

import pytest

from drift import DriftError
from drift.records import ReturnInputs, Trajectory
from drift.weights import (
    ReturnConfig,
    WeightsConfig,
    compute,
    drift_weights,
    effective_sample_size,
    group_weights,
    run_weights,
    swift_weights,
    trajectory_return,
)

REF = ReturnConfig(gamma=0.9, format_penalty=-0.1, repeat_penalty=0.5)


def turn(status, norm=None):
    return {"response": "x", "answer": norm, "answer_norm": norm, "status": status, "tokens": 3, "finish_reason": "stop"}


def drift_row(pid, idx, turns, success_turn=None):
    return {"prompt_id": pid, "sample_idx": idx, "messages": [{"role": "user", "content": "q"}],
            "turns": turns, "gold": "c", "success_turn": success_turn, "metadata": {}, "schema_version": 1}


def ref_row(pid, rewards, norms, fp=0.0, t_star=None):
    return {"prompt_id": pid, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "turn_rewards": {f"t{i + 1}": r for i, r in enumerate(rewards)}, "answer_norms": norms,
            "format_penalty": fp, "verifier": {}, "t_star": t_star}


# --- returns -------------------------------------------------------------------------------

def test_return_success_at_turn_3_with_one_format_error():
    # wrong "b", unparseable, correct "c": 0.9^2 = 0.81; -0.1 format; 2 answers, 2 unique -> 0
    x = ReturnInputs([0.0, 0.0, 1.0], ["b", "c"], format_errors=1)
    assert trajectory_return(x, REF) == pytest.approx(0.71)


def test_return_repeats_are_penalized():
    # "B", "b ", "B" normalize to one answer: 0.5 * (1 - 1/3) = 1/3
    x = ReturnInputs([0.0, 0.0, 0.0], ["B", "b ", "B"], format_errors=0)
    assert trajectory_return(x, REF) == pytest.approx(-1 / 3)


def test_return_terms_configurable():
    x = ReturnInputs([0.0, 1.0], ["5", "5"], format_errors=2)
    # gamma 0.5 -> 0.5; 2 format errors * -0.2 = -0.4; 1 - 1/2 unique, lambda 1 -> -0.5
    assert trajectory_return(x, ReturnConfig(0.5, -0.2, 1.0)) == pytest.approx(-0.4)
    assert trajectory_return(x, ReturnConfig(0.9, 0.0, 0.0)) == pytest.approx(0.9)


def test_return_no_answers_no_repeat_penalty():
    assert trajectory_return(ReturnInputs([0.0], [], format_errors=1), REF) == pytest.approx(-0.1)


def test_timeout_turn_is_no_format_error_and_costs_only_what_is_configured(tmp_path):
    # timeout "5", correct "c": 0.9; no format error; 2 answers, 2 unique -> 0
    rows = [drift_row("p", 0, [turn("timeout", "5"), turn("correct", "c")], 2)]
    inp = write(tmp_path / "in.jsonl", rows)
    got, _ = compute(WeightsConfig(input=inp, output="o", method="sft"))
    assert got[0].ret == pytest.approx(0.9)
    got, _ = compute(WeightsConfig(input=inp, output="o", method="sft", timeout_penalty=-0.25))
    assert got[0].ret == pytest.approx(0.65)
    x = ReturnInputs([0.0, 0.0], ["1", "2"], format_errors=1, timeouts=1)
    assert trajectory_return(x, ReturnConfig(0.9, -0.1, 0.5, timeout_penalty=-0.3)) == pytest.approx(-0.4)


def test_trajectory_record_counts_timeouts_apart():
    t = Trajectory.from_json(drift_row("p", 0, [turn("timeout", "5"), turn("unparseable"), turn("wrong", "6")]))
    assert (t.format_errors, t.timeouts) == (1, 1)
    assert {k: t.to_json()[k] for k in ("format_errors", "timeouts")} == {"format_errors": 1, "timeouts": 1}


def test_reference_row_return_uses_stored_format_penalty(tmp_path):
    # t2 success: 0.9; stored penalty -0.1; norms 5, 6 unique -> 0.8
    # second row: "5","5","" -> unique 1 over 3 answered turns -> 0.5 * 2/3
    path = tmp_path / "ref.jsonl"
    path.write_text(json.dumps(ref_row("p", [0, 1], ["5", "6"], -0.1, 2)) + "\n"
                    + json.dumps(ref_row("p", [0, 0, 0], ["5", "5", ""], 0.0)) + "\n")
    rows, _ = compute(WeightsConfig(input=str(path), output="x", method="sft"))
    assert rows[0].ret == pytest.approx(0.8)
    assert rows[1].ret == pytest.approx(-1 / 3)


# --- weights -------------------------------------------------------------------------------

def test_drift_weights_two_rows():
    # beta 0.1, R = [1, 0]: w = 2 e^10 / (e^10 + 1) = 2 / (1 + e^-10), and 2 / (e^10 + 1)
    w = drift_weights([1.0, 0.0], 0.1)
    assert w[0] == pytest.approx(1.9999092042, rel=1e-9)
    assert w[1] == pytest.approx(9.0795e-5, rel=1e-4)
    assert sum(w) / 2 == pytest.approx(1.0)


def test_drift_weights_three_rows_beta_1():
    # e^0.9 = 2.459603, e^0.81 = 2.247908, e^0 = 1; mean 1.902504
    w = drift_weights([0.9, 0.81, 0.0], 1.0)
    assert w == pytest.approx([1.292826, 1.181555, 0.525619], abs=1e-5)


def test_drift_weights_stable_for_large_returns():
    w = drift_weights([1000.0, 999.0], 0.01)  # exp(1e5) would overflow without the max shift
    assert all(math.isfinite(v) for v in w) and w[0] == pytest.approx(2.0)


def test_degenerate_group_drift_is_all_ones():
    assert drift_weights([-0.2, -0.2, -0.2], 0.1) == [1.0, 1.0, 1.0]


def test_swift_weights():
    # R = [1, 0, 0, 0]: mean 0.25, population std sqrt(0.1875) = 0.4330127
    w = swift_weights([1.0, 0.0, 0.0, 0.0])
    assert w[0] == pytest.approx(0.75 / (0.4330127 + 1e-6), rel=1e-6)
    assert w[1] == pytest.approx(-0.25 / (0.4330127 + 1e-6), rel=1e-6)
    assert swift_weights([0.5, 0.5]) == [0.0, 0.0]


def test_sft_rft_refit():
    assert group_weights("sft", [0.3, -1.0], [True, False], 0.1) == [1.0, 1.0]
    assert group_weights("rft", [0.81, 0.0], [True, False], 0.1) == [1.0, 0.0]
    assert group_weights("refit", [0.81, 0.0], [True, False], 0.1) == [0.81, 0.0]


def test_unknown_method():
    with pytest.raises(DriftError, match="unknown weighting method 'ppo'"):
        group_weights("ppo", [1.0], [True], 0.1)


def test_ess():
    assert effective_sample_size([1.0, 1.0, 1.0, 1.0]) == pytest.approx(4.0)
    assert effective_sample_size([2.0, 0.0]) == pytest.approx(1.0)  # 4 / 4
    assert effective_sample_size([0.0, 0.0]) == 0.0


# --- the weights stage on files ----------------------------------------------------------

def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_weights_stage_reference_format_matches_formula(tmp_path):
    rows = [ref_row("a", [1], ["4"], 0.0, 1), ref_row("a", [0, 0], ["3", "3"], 0.0),
            ref_row("b", [0, 1], ["1", "2"], -0.1, 2), ref_row("b", [0, 0], ["1", "2"], 0.0)]
    inp = write(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    diag = run_weights(WeightsConfig(input=inp, output=str(out), beta=0.1, gamma=0.9))
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [g["prompt_id"] for g in got] == ["a", "a", "b", "b"]  # same order, all fields kept
    assert got[0]["turn_rewards"] == {"t1": 1}
    # group a: R = [1, -0.25] (repeat: 0.5 * (1 - 1/2)); group b: R = [0.8, 0]
    ra, rb = [1.0, -0.25], [0.8, 0.0]
    for g, r in zip(got, ra + rb):
        assert g["return"] == pytest.approx(r)
    ea = [math.exp(r / 0.1) for r in ra]
    eb = [math.exp(r / 0.1) for r in rb]
    expect = [v / (sum(ea) / 2) for v in ea] + [v / (sum(eb) / 2) for v in eb]
    assert [g["weight"] for g in got] == pytest.approx(expect, rel=1e-9)
    assert diag["groups"] == 2 and diag["degenerate_groups"] == 0
    assert (tmp_path / "out.weights.json").is_file()


def test_degenerate_rules_tell_unsolved_from_equal_groups(tmp_path):
    # a: all fail, distinct answers -> R = [0, 0, 0] (unsolved and equal)
    # b: one success at turn 1 -> R = [1, 0] (solved, not equal)
    # c: all succeed at turn 1 -> R = [1, 1] (equal, but the positive data of every method)
    # d: all fail, "1","1" repeated in row 0 -> R = [-0.25, 0] (unsolved, not equal)
    rows = [drift_row("a", i, [turn("wrong", str(i))]) for i in range(3)]
    rows += [drift_row("b", 0, [turn("correct", "c")], 1), drift_row("b", 1, [turn("wrong", "d")])]
    rows += [drift_row("c", i, [turn("correct", "c")], 1) for i in range(2)]
    rows += [drift_row("d", 0, [turn("wrong", "1"), turn("wrong", "1")]), drift_row("d", 1, [turn("wrong", "2")])]
    inp = write(tmp_path / "in.jsonl", rows)
    b = [2 / (1 + math.exp(-10)), 2 / (1 + math.exp(10))]  # drift, beta 0.1, R = [1, 0]
    d = [2 / (1 + math.exp(2.5)), 2 / (1 + math.exp(-2.5))]  # R = [-0.25, 0]: exp(-2.5) vs exp(0), mean 1
    expected = {"keep": [1.0] * 3 + b + [1.0, 1.0] + d,
                "drop_unsolved": [0.0] * 3 + b + [1.0, 1.0] + [0.0, 0.0],
                "drop_equal": [0.0] * 3 + b + [0.0, 0.0] + d}
    for rule, weights in expected.items():
        out, diag = compute(WeightsConfig(input=inp, output="o", degenerate=rule))
        assert [r.weight for r in out] == pytest.approx(weights, rel=1e-9), rule
        assert diag["degenerate_groups"] == 2 and diag["degenerate_share"] == 0.5  # a and c
        assert diag["unsolved_groups"] == 2 and diag["unsolved_share"] == 0.5  # a and d
        assert diag["dropped_groups"] == {"keep": 0, "drop_unsolved": 2, "drop_equal": 2}[rule]
        assert diag["degenerate_rule"] == rule


def test_old_drop_rule_is_a_clear_error(tmp_path):
    from drift.config import build

    with pytest.raises(DriftError, match="'degenerate' must be one of \\['keep', 'drop_unsolved', 'drop_equal'\\]"):
        build(WeightsConfig, {"degenerate": "drop"})


def test_refit_negative_return_is_a_clear_error(tmp_path):
    rows = [drift_row("a", 0, [turn("wrong", "1"), turn("wrong", "1")]), drift_row("a", 1, [turn("correct", "2")], 1)]
    inp = write(tmp_path / "in.jsonl", rows)
    with pytest.raises(DriftError, match=r"in.jsonl:1: refit needs returns >= 0"):
        compute(WeightsConfig(input=inp, output="o", method="refit"))
    ok, _ = compute(WeightsConfig(input=inp, output="o", method="refit", repeat_penalty=0.0, format_penalty=0.0))
    assert [r.weight for r in ok] == [0.0, 1.0]


@pytest.mark.parametrize("content,match", [
    ('{"prompt_id": "a", "turn_rewards": {"t1": 1}}\n{not json\n', r"in.jsonl:2: malformed JSON"),
    ('{"turn_rewards": {"t1": 1}}\n', r"in.jsonl:1: missing field 'prompt_id'"),
    ('{"prompt_id": "a", "messages": []}\n', r"in.jsonl:1: row has neither 'turns'"),
    ('{"prompt_id": "a", "turn_rewards": {"t1": "NaN"}}\n', r"in.jsonl:1: non-finite return"),
    ('{"prompt_id": "a", "turn_rewards": {"first": 1}}\n', r"in.jsonl:1: turn_rewards key 'first'"),
    ("", r"no rows to weight \(empty input\)"),
])
def test_bad_input_names_file_and_line(tmp_path, content, match):
    p = tmp_path / "in.jsonl"
    p.write_text(content)
    with pytest.raises(DriftError, match=match):
        compute(WeightsConfig(input=str(p), output="o"))


def test_skip_bad_rows_counts(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text('{"prompt_id": "a", "turn_rewards": {"t1": 1}}\n{broken\n{"turn_rewards": {}}\n')
    rows, diag = compute(WeightsConfig(input=str(p), output="o", skip_bad_rows=True))
    assert len(rows) == 1 and diag["skipped_rows"] == 2  # the malformed line and the one without prompt_id


def test_missing_input_and_bad_config():
    with pytest.raises(DriftError, match="input not found"):
        compute(WeightsConfig(input="/nonexistent/x.jsonl", output="o"))
    with pytest.raises(DriftError, match="config key 'beta' must be a finite number > 0 or auto, got 0.0"):
        WeightsConfig(input="x", output="o", beta=0.0)


@pytest.mark.parametrize("key", ["beta", "gamma", "format_penalty", "repeat_penalty"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_settings_are_refused(key, value):
    with pytest.raises(DriftError, match=f"{key}'? must be a finite number( > 0 or auto)?, got {value}"):
        WeightsConfig(input="x", output="o", **{key: value})


def rollout_dir(path, status="complete"):
    """A rollout directory: manifest.json + trajectories/ shards (group a: one solved, one not)."""
    shards = path / "trajectories"
    shards.mkdir(parents=True)
    write(shards / "shard-00000.jsonl", [drift_row("a", 0, [turn("correct", "c")], 1), drift_row("a", 1, [turn("wrong", "d")])])
    (path / "manifest.json").write_text(json.dumps({"stage": "rollout", "status": status, "schema_version": 1}))
    return path


def test_a_weights_output_inside_the_rollout_directory_is_not_read_back(tmp_path):
    run = rollout_dir(tmp_path / "r1")
    diags = [run_weights(WeightsConfig(input=str(run), output=str(run / f"{arm}.jsonl"), method=arm))
             for arm in ("drift", "sft", "drift")]
    assert [d["rows"] for d in diags] == [2, 2, 2]  # the shards each time, never drift.jsonl or sft.jsonl
    assert [json.loads(x)["weight"] for x in (run / "drift.jsonl").read_text().splitlines()] == pytest.approx(
        [2 / (1 + math.exp(-10)), 2 * math.exp(-10) / (1 + math.exp(-10))])  # R = [1, 0], beta 0.1


def test_duplicate_trajectories_name_both_places(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    write(d / "a.jsonl", [drift_row("a", 0, [turn("wrong", "d")]), drift_row("a", 1, [turn("wrong", "e")])])
    write(d / "b.jsonl", [drift_row("b", 0, [turn("wrong", "d")]), drift_row("a", 1, [turn("wrong", "e")])])
    with pytest.raises(DriftError, match=r"b.jsonl:2: duplicate trajectory \(prompt_id='a', sample_idx=1\), "
                                         r"also at .*a.jsonl:2"):
        compute(WeightsConfig(input=str(d), output="o"))


def test_an_unfinished_rollout_is_refused(tmp_path):
    run = rollout_dir(tmp_path / "r1", status="running")
    shard = next((run / "trajectories").glob("*.jsonl"))
    for source in (run, run / "trajectories", shard):
        with pytest.raises(DriftError, match=r"r1(/trajectories(/[^:]*\.jsonl)?)?: the rollout is not complete \(manifest status "
                                             r"'running'\): finish it with `drift rollout --resume`"):
            compute(WeightsConfig(input=str(source), output="o"))


def test_a_row_from_a_newer_drift_is_refused(tmp_path):
    inp = write(tmp_path / "in.jsonl", [{**drift_row("a", 0, [turn("wrong", "d")]), "schema_version": 2}])
    with pytest.raises(DriftError, match=r"in.jsonl:1: written with schema_version 2, but this drift reads up to 1"):
        compute(WeightsConfig(input=inp, output="o"))


def test_auto_beta_on_hand_made_groups():
    """One group [1, 0]: with x = exp(1/beta), ESS/N = (x + 1)^2 / (2 (x^2 + 1)). ESS/N = 0.75 gives
    x^2 - 4x + 1 = 0, x = 2 + sqrt(3), beta = 1 / ln(2 + sqrt(3)) = 0.75933."""
    from drift.weights import auto_beta, ess_share

    beta, reached = auto_beta([[1.0, 0.0]], 0.75)
    assert beta == pytest.approx(1 / math.log(2 + math.sqrt(3)), rel=1e-9) and reached == pytest.approx(0.75)
    # two groups, and an all-equal group that does not count
    groups = [[1.0, 0.0, 0.0, 0.0], [0.9, 0.81, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    beta, reached = auto_beta(groups, 0.5)
    assert reached == pytest.approx(0.5, abs=1e-9) and ess_share(groups[:2], beta) == pytest.approx(0.5, abs=1e-9)
    assert ess_share(groups[:2], beta * 0.9) < 0.5 < ess_share(groups[:2], beta * 1.1)  # monotone
    # unreachable targets take the ends of the range; no group with spread: beta has no effect
    assert auto_beta([[1.0, 0.0]], 0.4)[0] == pytest.approx(1e-4)  # ESS/N never goes below 1/2 here
    assert auto_beta([[1.0, 1.0]], 0.25) == (1.0, None)


def test_auto_beta_through_the_weights_stage(tmp_path):
    from drift.config import build
    from drift.records import write_jsonl

    rows = [drift_row("a", 0, [turn("correct", "c")], 1), drift_row("a", 1, [turn("wrong", "b"), turn("wrong", "d")]),
            drift_row("b", 0, [turn("wrong", "b"), turn("correct", "c")], 2),
            drift_row("b", 1, [turn("wrong", "b"), turn("wrong", "b")])]
    src = tmp_path / "t.jsonl"
    write_jsonl(src, rows)
    diag = run_weights(WeightsConfig(input=str(src), output=str(tmp_path / "w.jsonl"), method="drift", beta="auto",
                                     ess_target=0.8))
    assert diag["beta_setting"] == "auto" and diag["ess_share_reached"] == pytest.approx(0.8)
    assert diag["beta"] > 0.1
    assert build(WeightsConfig, {"beta": "auto"}).beta == "auto" and build(WeightsConfig, {"beta": "0.3"}).beta == 0.3
    with pytest.raises(DriftError, match="config key 'beta' expects"):
        build(WeightsConfig, {"beta": "hot"})


def test_weight_share_by_success_turn(tmp_path):
    # one group: solved at turn 1 (R = 1), solved at turn 3 after two distinct wrong answers
    # (R = 0.9^2 = 0.81), unsolved (R = 0); drift at beta 0.1 weighs them exp(10) : exp(8.1) : 1
    rows = [drift_row("g", 0, [turn("correct", "c")], 1),
            drift_row("g", 1, [turn("wrong", "a"), turn("wrong", "b"), turn("correct", "c")], 3),
            drift_row("g", 2, [turn("wrong", "a")])]
    inp = write(tmp_path / "in.jsonl", rows)
    z = math.exp(10) + math.exp(8.1) + 1
    _, diag = compute(WeightsConfig(input=inp, output="o", beta=0.1, gamma=0.9))
    assert list(diag["weight_share_by_success_turn"]) == ["1", "3", "unsolved"]
    assert diag["weight_share_by_success_turn"] == pytest.approx(
        {"1": math.exp(10) / z, "3": math.exp(8.1) / z, "unsolved": 1 / z}, rel=1e-9)
    _, diag = compute(WeightsConfig(input=inp, output="o", method="rft"))  # the two successes alike
    assert diag["weight_share_by_success_turn"] == {"1": 0.5, "3": 0.5, "unsolved": 0.0}
    # swift's weights sum to zero in the group: shares of the absolute weight
    out, diag = compute(WeightsConfig(input=inp, output="o", method="swift", gamma=0.9))
    w = [abs(r.weight) for r in out]
    assert diag["weight_share_by_success_turn"] == pytest.approx(
        {"1": w[0] / sum(w), "3": w[1] / sum(w), "unsolved": w[2] / sum(w)}, rel=1e-9)
    # the reference format: t_star, else the first turn with a reward
    ref = [ref_row("h", [0, 1], ["a", "c"], t_star=2), ref_row("h", [0, 0, 1], ["a", "b", "c"]), ref_row("h", [0], ["a"])]
    _, diag = compute(WeightsConfig(input=write(tmp_path / "ref.jsonl", ref), output="o", method="sft"))
    assert diag["weight_share_by_success_turn"] == pytest.approx({"2": 1 / 3, "3": 1 / 3, "unsolved": 1 / 3})
