"""Eval metrics on hand-made trajectories with known answers; pass@k against brute force."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest

from drift import DriftError
from drift.metrics import compute_metrics, mean_and_se, pass_at_k, pass_ks, unique_ratio
from drift.records import Trajectory, Turn


def turn(status: str, answer: str | None = None, response: str = "ab", tokens: int = 3,
         finish_reason: str = "stop") -> Turn:
    return Turn(response=response, answer=answer, answer_norm=answer, status=status, tokens=tokens,
                finish_reason=finish_reason)


def traj(pid: str, turns: list[Turn], sample_idx: int = 0) -> Trajectory:
    success = next((i + 1 for i, t in enumerate(turns) if t.correct), None)
    return Trajectory(prompt_id=pid, sample_idx=sample_idx, messages=[], turns=turns, gold="4", success_turn=success)


def five_problems() -> list[Trajectory]:
    """One sample per problem, T = 3. Every turn: 2 characters, 3 tokens.

    P1: 4 (correct)                 solved at 1, answers {4}        ratio 1
    P2: 5 wrong, 4 correct           solved at 2, answers {5, 4}     ratio 1
    P3: unparseable, 7 wrong, 7      unsolved,   answers [7, 7]      ratio 1/2
    P4: 1 wrong, unparseable, 2 ok   solved at 3, answers {1, 2}     ratio 1
    P5: 9, 8, 9 wrong (last cut)     unsolved,   answers [9, 8, 9]   ratio 2/3
    """
    return [
        traj("P1", [turn("correct", "4")]),
        traj("P2", [turn("wrong", "5"), turn("correct", "4")]),
        traj("P3", [turn("unparseable"), turn("wrong", "7"), turn("wrong", "7")]),
        traj("P4", [turn("wrong", "1"), turn("unparseable"), turn("correct", "2")]),
        traj("P5", [turn("wrong", "9"), turn("wrong", "8"), turn("wrong", "9", finish_reason="length")]),
    ]


def test_succ_at_k_and_per_turn_metrics():
    m = compute_metrics(five_problems(), max_turns=3)
    assert m["num_problems"] == 5 and m["num_trajectories"] == 5 and m["samples_per_problem"] == 1
    # solved within 1: P1; within 2: P1, P2; within 3: P1, P2, P4
    assert m["succ_at_k"] == pytest.approx([0.2, 0.4, 0.6])
    assert m["succ_at_k_by_problem"] == pytest.approx([0.2, 0.4, 0.6])
    assert m["accuracy"] == pytest.approx(0.6)
    # se at k=1: values [1,0,0,0,0], mean .2, sample var (0.64 + 4*0.04)/4 = 0.2, se = sqrt(0.2/5) = 0.2
    # k=2: values [1,1,0,0,0], mean .4, var (2*0.36 + 3*0.16)/4 = 0.3; k=3: [1,1,0,1,0], var 0.3 too
    assert m["succ_at_k_se"] == pytest.approx([0.2, math.sqrt(0.3 / 5), math.sqrt(0.3 / 5)])
    # turn 1 reached by all 5; turn 2 by P2..P5; turn 3 by P3..P5
    assert m["attempted"] == [5, 4, 3]
    assert m["correct"] == [1, 1, 1]
    assert m["cond_acc"] == pytest.approx([1 / 5, 1 / 4, 1 / 3])
    # k=2: parsed-wrong at turn 1 and reached turn 2: P2, P4, P5 (P3 was unparseable); P2 corrected -> 1/3
    # k=3: parsed-wrong at turn 2: P3, P5 (P4's turn 2 was unparseable); none corrected -> 0
    assert m["correction_rate"][0] is None
    assert m["correction_rate"][1:] == pytest.approx([1 / 3, 0.0])
    assert m["correction_base"] == [0, 3, 2]
    assert m["unparseable_rate_by_turn"] == pytest.approx([1 / 5, 1 / 4, 0.0])
    # ratios 1, 1, 1/2, 1, 2/3; the >= 2-turn conversations are P2..P5
    assert m["unique_ratio"] == pytest.approx((1 + 1 + 0.5 + 1 + 2 / 3) / 5)
    assert m["unique_ratio_multi_turn"] == pytest.approx((1 + 0.5 + 1 + 2 / 3) / 4)
    assert m["multi_turn_conversations"] == 4
    assert m["mean_turns_to_success"] == pytest.approx((1 + 2 + 3) / 3)
    # 1 + 2 + 3 + 3 + 3 = 12 turns, 2 unparseable, 1 cut at the token limit
    assert m["mean_turns"] == pytest.approx(12 / 5)
    assert m["unparseable_rate"] == pytest.approx(2 / 12)
    assert m["timeout_rate"] == 0.0
    assert m["response_chars"] == pytest.approx(2.0)
    assert m["response_tokens"] == pytest.approx(3.0)
    assert m["total_tokens"] == 36
    assert m["length_cut_rate"] == pytest.approx(1 / 12)
    assert m["ended_early"] == 0
    assert m["pass_at_k"] == {}  # one sample per problem: no pass@k
    assert m["per_problem"]["P4"] == [0.0, 0.0, 1.0]


def test_scoring_at_a_smaller_turn_limit_truncates():
    m = compute_metrics(five_problems(), max_turns=2)
    # P4's success at turn 3 no longer counts
    assert m["succ_at_k"] == pytest.approx([0.2, 0.4])
    assert m["mean_turns_to_success"] == pytest.approx(1.5)
    # 1 + 2 + 2 + 2 + 2 = 9 turns, 2 unparseable (P3 t1, P4 t2)
    assert m["unparseable_rate"] == pytest.approx(2 / 9)
    assert m["total_tokens"] == 27
    # P3: [7] ratio 1; P5: [9, 8] ratio 1 -> all ratios 1
    assert m["unique_ratio"] == pytest.approx(1.0)


def test_ended_early_is_counted():
    # an unsolved conversation of 2 turns scored with T = 3 ended before the limit
    m = compute_metrics([traj("A", [turn("wrong", "1"), turn("wrong", "2")])], max_turns=3)
    assert m["ended_early"] == 1
    assert m["succ_at_k_se"] == [None, None, None]  # one problem: no standard error
    assert m["mean_turns_to_success"] is None
    assert m["correction_rate"] == [None, 0.0, None]  # turn 3 never reached: no base


def test_samples_per_problem_and_pass_at_k():
    """Three problems x 4 samples; turn-1 correct counts c = 2, 0, 1."""
    t1_ok = [turn("correct", "4")]
    late = [turn("wrong", "3"), turn("correct", "4")]
    fail = [turn("wrong", "3"), turn("wrong", "3")]
    trajs = (
        [traj("A", t, i) for i, t in enumerate([t1_ok, late, fail, t1_ok])]
        + [traj("B", t, i) for i, t in enumerate([fail, fail, late, fail])]
        + [traj("C", t, i) for i, t in enumerate([fail, t1_ok, fail, fail])]
    )
    m = compute_metrics(trajs, max_turns=2)
    assert m["samples_per_problem"] == 4
    # pass@1: mean of c/n = (2/4 + 0 + 1/4) / 3
    # pass@2: A 1 - C(2,2)/C(4,2) = 5/6; B 0; C 1 - C(3,2)/C(4,2) = 1/2
    # pass@4: A 1; B 0; C 1
    assert m["pass_at_k"] == pytest.approx({"1": 0.25, "2": (5 / 6 + 0.5) / 3, "4": 2 / 3})
    # succ@1 = 3/12, succ@2 = (3 + 2 late) / 12; per problem: A 3/4, B 1/4, C 1/4
    assert m["succ_at_k"] == pytest.approx([3 / 12, 5 / 12])
    assert m["per_problem"]["A"] == pytest.approx([0.5, 0.75])
    # repeated wrong answers "3", "3": ratio 1/2 for the 7 failed conversations, 1 for the others
    assert m["unique_ratio"] == pytest.approx((7 * 0.5 + 5 * 1.0) / 12)


def test_unequal_samples_report_both_averages():
    trajs = [traj("A", [turn("correct", "4")], 0), traj("A", [turn("wrong", "1")], 1),
             traj("B", [turn("correct", "4")], 0)]
    m = compute_metrics(trajs, max_turns=1)
    assert m["samples_per_problem"] == [1, 2]
    assert m["succ_at_k"] == pytest.approx([2 / 3])  # over trajectories
    assert m["succ_at_k_by_problem"] == pytest.approx([0.75])  # (1/2 + 1) / 2
    # per-problem values .5 and 1: sample var 0.125, se = sqrt(0.125 / 2) = 0.25
    assert m["succ_at_k_se"] == pytest.approx([0.25])
    assert m["pass_at_k"] == {}


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 10])
def test_pass_at_k_matches_brute_force(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            hit = sum(any(i < c for i in s) for s in subsets)  # samples 0..c-1 are the correct ones
            assert pass_at_k(n, c, k) == pytest.approx(hit / len(subsets), abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n():
    n, c, k = 400, 37, 150
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    assert pass_at_k(1000, 1, 1) == pytest.approx(1e-3)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_pass_ks_and_helpers():
    assert pass_ks(1) == [1]
    assert pass_ks(4) == [1, 2, 4]
    assert pass_ks(10) == [1, 2, 4, 8, 10]
    assert mean_and_se([]) == (None, None)
    assert mean_and_se([0.5]) == (0.5, None)
    assert unique_ratio([turn("unparseable")]) is None


def test_bad_input():
    with pytest.raises(DriftError, match="no trajectories"):
        compute_metrics([], max_turns=3)
    with pytest.raises(DriftError, match="duplicate"):
        compute_metrics([traj("A", [turn("wrong", "1")]), traj("A", [turn("wrong", "1")])], max_turns=3)
    with pytest.raises(DriftError, match="max_turns"):
        compute_metrics(five_problems(), max_turns=0)
