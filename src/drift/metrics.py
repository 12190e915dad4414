"""Multi-turn evaluation metrics: pure functions of a list of trajectories and the turn limit T.

Only the first T turns of each trajectory count (a success after turn T is a failure), so a
rollout made with more turns can be scored at a smaller T. Definitions, with "trajectory"
one conversation and a problem's trajectories its n samples:

- succ@k (k = 1..T): share of trajectories solved within k turns. Its standard error is taken
  over problems: the sample standard deviation (ddof 1) of the per-problem means divided by
  sqrt(#problems); with n = 1 that is sqrt(p(1-p)/(P-1)), the binomial error. When problems
  have unequal sample counts the mean over problems is reported too (`succ_at_k_by_problem`).
- attempted[k], correct[k]: trajectories that reached turn k / whose turn k was correct.
- conditional accuracy at k: correct[k] / attempted[k].
- correction rate at k (k >= 2): among trajectories whose turn k-1 answer was parsed but
  wrong (status "wrong") and that reached turn k, the share correct at turn k. It differs
  from conditional accuracy by leaving out trajectories whose previous turn had no parseable
  answer: it measures fixing a wrong answer after feedback, not fixing the format.
- unique answer ratio: per trajectory, distinct normalized answers / parsed answers
  (turns with an `answer_norm`), averaged over trajectories with at least one parsed answer.
  `unique_ratio_multi_turn` averages over trajectories of >= 2 turns only: single-turn
  successes always score 1 and hide repetition collapse.
- mean turns to success: mean success turn over trajectories solved within T.
- unparseable rate: turns with status "unparseable" / all generated turns (timeouts counted apart).
- pass@k: the unbiased estimator 1 - C(n-c, k) / C(n, k) per problem, averaged over problems,
  with c = number of the problem's n samples correct at TURN 1 (independent samples, no
  feedback). Computed for k = 1, 2, 4, ... and n, only when every problem has n > 1 samples.
- lengths: characters and generated tokens per generated assistant turn (means), total generated
  tokens, share of turns cut at max_new_tokens. (Generated: a planted turn 1 is left out of both.)
- intervals (`*_ci`, 95%): succ@k over problems (`drift.stats.rate_ci`: Wilson with one sample per
  problem, else the bootstrap over problems), conditional accuracy and correction rate by Wilson
  over their conversations, pass@k by the bootstrap over problems.

Each protocol of `drift eval` adds its own measures (`protocol_metrics`):
- oracle (the try-again loop above): the conversation stops at the first correct answer, so the
  feedback itself tells the model it was wrong: every correction number above is *with oracle
  feedback*.
- no-oracle (SCoRe's second attempt, Kumar et al. 2024): every conversation makes a second attempt
  after a feedback that does not say whether the first was right. Over conversations with >= 2
  turns: Acc@t1, Acc@t2, Δ = Acc@t2 - Acc@t1, Δ i→c (share wrong at turn 1 and correct at turn 2),
  Δ c→i (correct, then not), so Δ = Δ i→c - Δ c→i; the exact McNemar p of turn 2 against turn 1.
- planted: turn 1 of every conversation is a given wrong answer (metadata "planted"); over those
  conversations: P(correct at turn 2 | planted wrong), the share of turn-2 answers that repeat the
  planted one (same normalized answer), and success within T.
- equal-sample pass@k beside succ@k (k = 1..min(T, n), n >= 2 samples per problem): k independent
  turn-1 samples against k sequential attempts of one conversation.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from drift import DriftError
from drift.records import Trajectory, Turn
from drift.stats import bootstrap_ci, mcnemar_exact, paired_counts, rate_ci, wilson

PROTOCOLS = ("oracle", "no-oracle", "planted")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with c correct among n samples (product form, no big binomials).

    1 - C(n-c, k)/C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i).
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_ks(n: int) -> list[int]:
    """The k reported for n samples: powers of two below n, and n itself."""
    ks = []
    k = 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def mean_and_se(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and its standard error (sample std with ddof 1 / sqrt(len)); None where undefined."""
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1)
    return m, math.sqrt(var / len(values))


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def solved_turn(traj: Trajectory, max_turns: int) -> int | None:
    """The 1-based success turn if it is within max_turns, else None."""
    s = traj.success_turn
    return s if s is not None and s <= max_turns else None


def group_by_problem(trajs: Sequence[Trajectory]) -> OrderedDict[str, list[Trajectory]]:
    """Prompt groups in first-seen order; a repeated (prompt_id, sample_idx) is an error."""
    groups: OrderedDict[str, list[Trajectory]] = OrderedDict()
    seen = set()
    for t in trajs:
        if t.key in seen:
            raise DriftError(f"duplicate trajectory (prompt_id={t.prompt_id!r}, sample_idx={t.sample_idx})")
        seen.add(t.key)
        groups.setdefault(t.prompt_id, []).append(t)
    return groups


def succ_at_k(trajs: Sequence[Trajectory], max_turns: int) -> dict[str, Any]:
    """succ@k for k = 1..T over trajectories, over problems, and the standard error over problems."""
    solved = {t.key: solved_turn(t, max_turns) for t in trajs}
    per_problem: OrderedDict[str, list[float]] = OrderedDict()
    for pid, group in group_by_problem(trajs).items():
        turns = [solved[t.key] for t in group]
        per_problem[pid] = [sum(s is not None and s <= k for s in turns) / len(group) for k in range(1, max_turns + 1)]
    flat, by_problem, se, ci = [], [], [], []
    for k in range(1, max_turns + 1):
        flat.append(sum(s is not None and s <= k for s in solved.values()) / len(trajs))
        values = [v[k - 1] for v in per_problem.values()]
        mean, err = mean_and_se(values)
        by_problem.append(mean)
        se.append(err)
        ci.append(_interval(rate_ci(values)))
    return {"succ_at_k": flat, "succ_at_k_by_problem": by_problem, "succ_at_k_se": se, "succ_at_k_ci": ci,
            "per_problem": per_problem}


def _interval(ci: tuple[float, float] | None) -> list[float] | None:
    return None if ci is None else [ci[0], ci[1]]


def per_turn(trajs: Sequence[Trajectory], max_turns: int) -> dict[str, list]:
    """attempted, correct, conditional accuracy, correction rate and unparseable rate by turn."""
    attempted = [0] * max_turns
    correct = [0] * max_turns
    unparseable = [0] * max_turns
    wrong_before = [0] * max_turns  # reached turn k with a parsed wrong answer at turn k-1
    corrected = [0] * max_turns
    for t in trajs:
        turns = t.turns[:max_turns]
        for i, turn in enumerate(turns):
            attempted[i] += 1
            correct[i] += turn.correct
            unparseable[i] += turn.status == "unparseable"
            if i > 0 and turns[i - 1].status == "wrong":
                wrong_before[i] += 1
                corrected[i] += turn.correct
    return {
        "attempted": attempted,
        "correct": correct,
        "cond_acc": [_ratio(c, a) for c, a in zip(correct, attempted)],
        "cond_acc_ci": [_interval(wilson(c, a)) for c, a in zip(correct, attempted)],
        "correction_rate": [None] + [_ratio(c, w) for c, w in zip(corrected[1:], wrong_before[1:])],
        "correction_rate_ci": [None] + [_interval(wilson(c, w)) for c, w in zip(corrected[1:], wrong_before[1:])],
        "corrected": [0] + corrected[1:],
        "correction_base": [0] + wrong_before[1:],
        "unparseable_rate_by_turn": [_ratio(u, a) for u, a in zip(unparseable, attempted)],
    }


def unique_ratio(turns: Sequence[Turn]) -> float | None:
    """Distinct normalized answers / parsed answers of one conversation (None without answers)."""
    answers = [t.answer_norm for t in turns if t.answer_norm]
    return len(set(answers)) / len(answers) if answers else None


def unique_ratios(trajs: Sequence[Trajectory], max_turns: int) -> dict[str, float | None]:
    all_r, multi_r = [], []
    for t in trajs:
        turns = t.turns[:max_turns]
        r = unique_ratio(turns)
        if r is None:
            continue
        all_r.append(r)
        if len(turns) >= 2:
            multi_r.append(r)
    return {"unique_ratio": mean_and_se(all_r)[0], "unique_ratio_multi_turn": mean_and_se(multi_r)[0],
            "multi_turn_conversations": len(multi_r)}


def pass_at_k_metrics(trajs: Sequence[Trajectory]) -> dict[str, Any]:
    """pass@k from turn-1 correctness; empty when some problem has a single sample."""
    groups = group_by_problem(trajs)
    n_min = min(len(g) for g in groups.values())
    if n_min < 2:
        return {"pass_at_k": {}, "pass_at_k_se": {}, "pass_at_k_ci": {}}
    values, ses, cis = {}, {}, {}
    for k in pass_ks(n_min):
        per = _pass_per_problem(groups, k)
        values[str(k)], ses[str(k)] = mean_and_se(per)
        cis[str(k)] = _interval(bootstrap_ci(per))
    return {"pass_at_k": values, "pass_at_k_se": ses, "pass_at_k_ci": cis}


def _pass_per_problem(groups: OrderedDict[str, list[Trajectory]], k: int) -> list[float]:
    return [pass_at_k(len(g), sum(bool(t.turns) and t.turns[0].correct for t in g), k) for g in groups.values()]


def pass_vs_succ(trajs: Sequence[Trajectory], max_turns: int) -> list[dict[str, Any]]:
    """Equal-sample comparison, k = 1..min(T, n): pass@k of k independent turn-1 samples (the unbiased
    estimator over each problem's n samples) beside succ@k of k sequential attempts; empty when some
    problem has a single sample. Both are means over problems, with bootstrap intervals over problems."""
    groups = group_by_problem(trajs)
    n_min = min(len(g) for g in groups.values())
    if n_min < 2:
        return []
    succ = succ_at_k(trajs, max_turns)["per_problem"]
    rows = []
    for k in range(1, min(max_turns, n_min) + 1):
        passes, seq = _pass_per_problem(groups, k), [v[k - 1] for v in succ.values()]
        rows.append({"k": k, "pass": sum(passes) / len(passes), "pass_ci": _interval(bootstrap_ci(passes)),
                     "succ": sum(seq) / len(seq), "succ_ci": _interval(bootstrap_ci(seq))})
    return rows


def _shares(per_problem: OrderedDict[str, list[float]]) -> tuple[float, list[float] | None]:
    """The mean over problems of per-problem means, and its interval (`drift.stats.rate_ci`)."""
    values = [sum(v) / len(v) for v in per_problem.values()]
    return sum(values) / len(values), _interval(rate_ci(values))


def second_attempt_metrics(trajs: Sequence[Trajectory]) -> dict[str, Any] | None:
    """SCoRe's no-oracle measures over the conversations with >= 2 turns (None if there are none).

    Rates are means over problems of each problem's share (with one sample per problem: shares of
    conversations). The McNemar p compares turn 2 with turn 1 on the same conversations; it is
    given with one sample per problem only (several samples of a problem are not independent)."""
    two = [t for t in trajs if len(t.turns) >= 2]
    if not two:
        return None
    t1: OrderedDict[str, list[float]] = OrderedDict()
    t2: OrderedDict[str, list[float]] = OrderedDict()
    for t in two:
        t1.setdefault(t.prompt_id, []).append(float(t.turns[0].correct))
        t2.setdefault(t.prompt_id, []).append(float(t.turns[1].correct))
    i_to_c = OrderedDict((p, [float(b > a) for a, b in zip(t1[p], t2[p])]) for p in t1)
    c_to_i = OrderedDict((p, [float(a > b) for a, b in zip(t1[p], t2[p])]) for p in t1)
    delta = [sum(b - a for a, b in zip(t1[p], t2[p])) / len(t1[p]) for p in t1]
    (acc1, ci1), (acc2, ci2) = _shares(t1), _shares(t2)
    (ic, ic_ci), (ci, ci_ci) = _shares(i_to_c), _shares(c_to_i)
    one_each = all(len(v) == 1 for v in t1.values())
    counts = (sum(sum(v) for v in i_to_c.values()), sum(sum(v) for v in c_to_i.values()))
    return {
        "conversations": len(two), "problems": len(t1),
        "acc_t1": acc1, "acc_t1_ci": ci1, "acc_t2": acc2, "acc_t2_ci": ci2,
        "delta": sum(delta) / len(delta), "delta_ci": _interval(bootstrap_ci(delta)),
        "delta_i_to_c": ic, "delta_i_to_c_ci": ic_ci, "delta_c_to_i": ci, "delta_c_to_i_ci": ci_ci,
        "i_to_c": int(counts[0]), "c_to_i": int(counts[1]),
        "mcnemar_p": mcnemar_exact(int(counts[0]), int(counts[1])) if one_each else None,
        "per_problem_t2": {p: sum(v) / len(v) for p, v in t2.items()},
    }


def planted_metrics(trajs: Sequence[Trajectory], max_turns: int) -> dict[str, Any] | None:
    """Measures of the planted-answer probe over conversations whose turn 1 was planted (None if none).

    correct_t2: P(correct at turn 2 | planted wrong); repeat_t2: share of turn-2 answers whose
    normalized answer is the planted one (over all conversations: an unparseable turn 2 repeats
    nothing); solved: success within T. Means over problems of each problem's share."""
    planted = [t for t in trajs if t.metadata.get("planted")]
    if not planted:
        return None
    correct: OrderedDict[str, list[float]] = OrderedDict()
    repeat: OrderedDict[str, list[float]] = OrderedDict()
    solved: OrderedDict[str, list[float]] = OrderedDict()
    for t in planted:
        second = t.turns[1] if len(t.turns) > 1 else None
        correct.setdefault(t.prompt_id, []).append(float(second is not None and second.correct))
        repeat.setdefault(t.prompt_id, []).append(
            float(second is not None and second.answer_norm is not None and second.answer_norm == t.turns[0].answer_norm))
        solved.setdefault(t.prompt_id, []).append(float(solved_turn(t, max_turns) is not None))
    (c2, c2_ci), (rep, rep_ci), (sol, sol_ci) = _shares(correct), _shares(repeat), _shares(solved)
    return {"conversations": len(planted), "problems": len(correct),
            "correct_t2": c2, "correct_t2_ci": c2_ci, "repeat_t2": rep, "repeat_t2_ci": rep_ci,
            "solved": sol, "solved_ci": sol_ci,
            "per_problem_t2": {p: sum(v) / len(v) for p, v in correct.items()}}


def paired_test(a: dict[str, float], b: dict[str, float]) -> dict[str, Any] | None:
    """Two runs' per-problem rates on their shared problems: the mean difference b - a with its paired
    standard error, and with 0/1 outcomes the discordant counts and the exact McNemar p."""
    shared = [p for p in a if p in b]
    if not shared:
        return None
    xa, xb = [a[p] for p in shared], [b[p] for p in shared]
    diff, se = mean_and_se([y - x for x, y in zip(xa, xb)])
    counts = paired_counts(xa, xb)
    return {"shared": len(shared), "diff": diff, "se": se,
            "b_only": None if counts is None else counts[0], "a_only": None if counts is None else counts[1],
            "mcnemar_p": None if counts is None else mcnemar_exact(*counts)}


def protocol_metrics(trajs: Sequence[Trajectory], max_turns: int, protocol: str) -> dict[str, Any]:
    """The measures `protocol` adds (module docstring), plus the equal-sample pass@k beside succ@k."""
    if protocol not in PROTOCOLS:
        raise DriftError(f"unknown eval protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    out: dict[str, Any] = {"protocol": protocol, "pass_vs_succ": pass_vs_succ(trajs, max_turns)}
    if protocol == "no-oracle":
        out["second_attempt"] = second_attempt_metrics(trajs)
    elif protocol == "planted":
        out["planted"] = planted_metrics(trajs, max_turns)
    return out


def generated_turns(t: Trajectory, max_turns: int) -> list[Turn]:
    """The turns the model wrote within max_turns: a planted turn 1 was given, not generated."""
    return t.turns[1 if t.metadata.get("planted") else 0:max_turns]


def length_metrics(trajs: Sequence[Trajectory], max_turns: int) -> dict[str, Any]:
    """Lengths of the generated turns (a planted answer's length is not the model's)."""
    turns = [turn for t in trajs for turn in generated_turns(t, max_turns)]
    total_tokens = sum(t.tokens for t in turns)
    return {
        "response_chars": _ratio(sum(len(t.response) for t in turns), len(turns)),
        "response_tokens": _ratio(total_tokens, len(turns)),
        "total_tokens": total_tokens,
        "length_cut_rate": _ratio(sum(t.finish_reason == "length" for t in turns), len(turns)),
    }


def compute_metrics(trajs: Sequence[Trajectory], max_turns: int, protocol: str = "oracle") -> dict[str, Any]:
    """Every metric of the module docstring for these trajectories, scored with turn limit max_turns
    and the measures of the eval protocol they were made under."""
    if max_turns < 1:
        raise DriftError(f"max_turns must be >= 1, got {max_turns}")
    if not trajs:
        raise DriftError("no trajectories to score")
    groups = group_by_problem(trajs)
    sizes = sorted({len(g) for g in groups.values()})
    turns = [turn for t in trajs for turn in t.turns[:max_turns]]
    generated = [turn for t in trajs for turn in generated_turns(t, max_turns)]
    solved = [s for s in (solved_turn(t, max_turns) for t in trajs) if s is not None]
    succ = succ_at_k(trajs, max_turns)
    out: dict[str, Any] = {
        "num_problems": len(groups),
        "num_trajectories": len(trajs),
        "samples_per_problem": sizes[0] if len(sizes) == 1 else sizes,  # the distinct sizes when they differ
        "max_turns": max_turns,
        "accuracy": succ["succ_at_k"][-1],
        "accuracy_se": succ["succ_at_k_se"][-1],
        "succ_at_k": succ["succ_at_k"],
        "succ_at_k_se": succ["succ_at_k_se"],
        "succ_at_k_ci": succ["succ_at_k_ci"],
        "succ_at_k_by_problem": succ["succ_at_k_by_problem"],
        **per_turn(trajs, max_turns),
        **unique_ratios(trajs, max_turns),
        "mean_turns_to_success": _ratio(sum(solved), len(solved)),
        "mean_turns": _ratio(len(turns), len(trajs)),
        "unparseable_rate": _ratio(sum(t.status == "unparseable" for t in generated), len(generated)),
        "timeout_rate": _ratio(sum(t.status == "timeout" for t in turns), len(turns)),
        "ended_early": sum(solved_turn(t, max_turns) is None and len(t.turns) < max_turns for t in trajs),
        **pass_at_k_metrics(trajs),
        **length_metrics(trajs, max_turns),
        **protocol_metrics(trajs, max_turns, protocol),
        "per_problem": succ["per_problem"],
    }
    return out
