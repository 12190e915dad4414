"""The correction measures of each eval protocol on hand-made conversations with literal answers."""

from __future__ import annotations

import pytest

from drift import DriftError
from drift.metrics import compute_metrics, paired_test, pass_vs_succ, planted_metrics, second_attempt_metrics
from drift.stats import wilson
from tests.test_metrics import traj, turn


def no_oracle_conversations():
    """One sample per problem, two attempts each whatever the first answer was.

    A right, right    B wrong, right (i→c)   C right, wrong (c→i)
    D wrong, unparseable                     E wrong, right (i→c)     F one turn only: left out
    """
    return [traj("A", [turn("correct", "4"), turn("correct", "4")]),
            traj("B", [turn("wrong", "5"), turn("correct", "4")]),
            traj("C", [turn("correct", "4"), turn("wrong", "6")]),
            traj("D", [turn("wrong", "5"), turn("unparseable")]),
            traj("E", [turn("wrong", "3"), turn("correct", "4")]),
            traj("F", [turn("wrong", "3")])]


def test_second_attempt_measures():
    m = second_attempt_metrics(no_oracle_conversations())
    assert m["conversations"] == 5 and m["problems"] == 5
    assert m["acc_t1"] == pytest.approx(2 / 5) and m["acc_t2"] == pytest.approx(3 / 5)
    assert m["delta"] == pytest.approx(1 / 5)
    assert m["delta_i_to_c"] == pytest.approx(2 / 5) and m["delta_c_to_i"] == pytest.approx(1 / 5)
    assert m["i_to_c"] == 2 and m["c_to_i"] == 1
    # 2 against 1 discordant: 2 * (C(3,0) + C(3,1)) / 2^3 = 1
    assert m["mcnemar_p"] == pytest.approx(1.0)
    assert m["acc_t1_ci"] == pytest.approx(list(wilson(2, 5)))
    assert m["acc_t2_ci"] == pytest.approx(list(wilson(3, 5)))
    assert m["per_problem_t2"] == {"A": 1.0, "B": 1.0, "C": 0.0, "D": 0.0, "E": 1.0}
    assert second_attempt_metrics([traj("F", [turn("wrong", "3")])]) is None


def test_second_attempt_with_several_samples_has_no_mcnemar():
    trajs = [traj("A", [turn("wrong", "5"), turn("correct", "4")], 0),
             traj("A", [turn("correct", "4"), turn("correct", "4")], 1),
             traj("B", [turn("wrong", "5"), turn("wrong", "5")], 0),
             traj("B", [turn("wrong", "5"), turn("wrong", "7")], 1)]
    m = second_attempt_metrics(trajs)
    # per problem: A t1 1/2, t2 1; B 0, 0 -> means over problems 1/4 and 1/2
    assert m["acc_t1"] == pytest.approx(0.25) and m["acc_t2"] == pytest.approx(0.5)
    assert m["delta"] == pytest.approx(0.25) and m["delta_i_to_c"] == pytest.approx(0.25)
    assert m["mcnemar_p"] is None


def planted_conversations():
    """Turn 1 of each is a planted wrong answer (metadata "planted"), T = 3.

    A 7 | 4 right                  correct at 2, no repeat, solved
    B 9 | 9, 8                     repeats the planted 9, unsolved
    C 5 | unparseable, 4 right     solved at 3
    D 6 | 6, 4 right               repeats, solved at 3
    """
    rows = [traj("A", [turn("wrong", "7"), turn("correct", "4")]),
            traj("B", [turn("wrong", "9"), turn("wrong", "9"), turn("wrong", "8")]),
            traj("C", [turn("wrong", "5"), turn("unparseable"), turn("correct", "4")]),
            traj("D", [turn("wrong", "6"), turn("wrong", "6"), turn("correct", "4")])]
    for t in rows:
        t.metadata["planted"] = True
    return rows


def test_planted_measures():
    m = planted_metrics(planted_conversations(), max_turns=3)
    assert m["conversations"] == 4
    assert m["correct_t2"] == pytest.approx(1 / 4)
    assert m["repeat_t2"] == pytest.approx(2 / 4)
    assert m["solved"] == pytest.approx(3 / 4)
    assert m["correct_t2_ci"] == pytest.approx(list(wilson(1, 4)))
    assert planted_metrics(planted_conversations(), max_turns=2)["solved"] == pytest.approx(1 / 4)
    assert planted_metrics([traj("A", [turn("wrong", "7")])], max_turns=3) is None  # nothing planted


def test_planted_protocol_in_compute_metrics_agrees_with_the_correction_rate():
    m = compute_metrics(planted_conversations(), max_turns=3, protocol="planted")
    assert m["protocol"] == "planted"
    assert m["planted"]["correct_t2"] == pytest.approx(m["correction_rate"][1])
    assert m["succ_at_k"][0] == 0.0  # a planted turn 1 is never right
    assert m["correction_rate_ci"][1] == pytest.approx(list(wilson(1, 4)))
    # lengths and format over the 7 generated turns only (each 2 characters, 3 tokens; C's turn 2 unparseable)
    assert (m["response_chars"], m["response_tokens"], m["total_tokens"]) == pytest.approx((2.0, 3.0, 21))
    assert m["unparseable_rate"] == pytest.approx(1 / 7)
    assert m["corrected"] == [0, 1, 1]  # A at turn 2; D at turn 3 (C's turn 2 had no answer: not counted)


def test_no_oracle_protocol_and_unknown_protocol():
    m = compute_metrics(no_oracle_conversations(), max_turns=2, protocol="no-oracle")
    assert m["second_attempt"]["acc_t2"] == pytest.approx(3 / 5)
    assert "planted" not in m and "second_attempt" not in compute_metrics(no_oracle_conversations(), 2)
    with pytest.raises(DriftError, match="unknown eval protocol"):
        compute_metrics(no_oracle_conversations(), max_turns=2, protocol="oracle-free")


def test_equal_sample_pass_at_k_beside_succ_at_k():
    """Three problems x 4 samples; turn-1 correct counts c = 2, 0, 1 (as in test_metrics)."""
    t1_ok = [turn("correct", "4")]
    late = [turn("wrong", "3"), turn("correct", "4")]
    fail = [turn("wrong", "3"), turn("wrong", "3")]
    trajs = ([traj("A", t, i) for i, t in enumerate([t1_ok, late, fail, t1_ok])]
             + [traj("B", t, i) for i, t in enumerate([fail, fail, late, fail])]
             + [traj("C", t, i) for i, t in enumerate([fail, t1_ok, fail, fail])])
    rows = pass_vs_succ(trajs, max_turns=2)
    assert [r["k"] for r in rows] == [1, 2]
    # k=1: both are the turn-1 accuracy, (2/4 + 0 + 1/4) / 3
    assert rows[0]["pass"] == pytest.approx(0.25) and rows[0]["succ"] == pytest.approx(0.25)
    # k=2: pass@2 = (5/6 + 0 + 1/2) / 3 = 4/9; succ@2 per problem 3/4, 1/4, 1/4 -> 5/12
    assert rows[1]["pass"] == pytest.approx(4 / 9) and rows[1]["succ"] == pytest.approx(5 / 12)
    assert rows[1]["pass_ci"][0] <= rows[1]["pass"] <= rows[1]["pass_ci"][1]
    assert pass_vs_succ(no_oracle_conversations(), max_turns=2) == []  # one sample per problem


def test_paired_test_on_shared_problems():
    a = {"P1": 1.0, "P2": 0.0, "P3": 0.0}
    b = {"P1": 1.0, "P2": 1.0, "P3": 1.0, "P4": 0.0}
    r = paired_test(a, b)
    assert r["shared"] == 3 and r["diff"] == pytest.approx(2 / 3)
    assert (r["b_only"], r["a_only"]) == (2, 0)
    assert r["mcnemar_p"] == pytest.approx(0.5)  # 2 * 1 / 2^2
    assert paired_test({"P1": 0.5}, {"P1": 1.0})["mcnemar_p"] is None
    assert paired_test({"P1": 1.0}, {"P2": 1.0}) is None
