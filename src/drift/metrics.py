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
- unparseable rate: turns with status "unparseable" / all turns (timeouts counted apart).
- pass@k: the unbiased estimator 1 - C(n-c, k) / C(n, k) per problem, averaged over problems,
  with c = number of the problem's n samples correct at TURN 1 (independent samples, no
  feedback). Computed for k = 1, 2, 4, ... and n, only when every problem has n > 1 samples.
- lengths: characters and generated tokens per assistant turn (means), total generated tokens,
  share of turns cut at max_new_tokens.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from drift import DriftError
from drift.records import Trajectory, Turn


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
    flat, by_problem, se = [], [], []
    for k in range(1, max_turns + 1):
        flat.append(sum(s is not None and s <= k for s in solved.values()) / len(trajs))
        mean, err = mean_and_se([v[k - 1] for v in per_problem.values()])
        by_problem.append(mean)
        se.append(err)
    return {"succ_at_k": flat, "succ_at_k_by_problem": by_problem, "succ_at_k_se": se, "per_problem": per_problem}


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
        "correction_rate": [None] + [_ratio(c, w) for c, w in zip(corrected[1:], wrong_before[1:])],
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
        return {"pass_at_k": {}, "pass_at_k_se": {}}
    values, ses = {}, {}
    for k in pass_ks(n_min):
        per = [pass_at_k(len(g), sum(bool(t.turns) and t.turns[0].correct for t in g), k) for g in groups.values()]
        values[str(k)], ses[str(k)] = mean_and_se(per)
    return {"pass_at_k": values, "pass_at_k_se": ses}


def length_metrics(trajs: Sequence[Trajectory], max_turns: int) -> dict[str, Any]:
    turns = [turn for t in trajs for turn in t.turns[:max_turns]]
    total_tokens = sum(t.tokens for t in turns)
    return {
        "response_chars": _ratio(sum(len(t.response) for t in turns), len(turns)),
        "response_tokens": _ratio(total_tokens, len(turns)),
        "total_tokens": total_tokens,
        "length_cut_rate": _ratio(sum(t.finish_reason == "length" for t in turns), len(turns)),
    }


def compute_metrics(trajs: Sequence[Trajectory], max_turns: int) -> dict[str, Any]:
    """Every metric of the module docstring for these trajectories, scored with turn limit max_turns."""
    if max_turns < 1:
        raise DriftError(f"max_turns must be >= 1, got {max_turns}")
    if not trajs:
        raise DriftError("no trajectories to score")
    groups = group_by_problem(trajs)
    sizes = sorted({len(g) for g in groups.values()})
    turns = [turn for t in trajs for turn in t.turns[:max_turns]]
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
        "succ_at_k_by_problem": succ["succ_at_k_by_problem"],
        **per_turn(trajs, max_turns),
        **unique_ratios(trajs, max_turns),
        "mean_turns_to_success": _ratio(sum(solved), len(solved)),
        "mean_turns": _ratio(len(turns), len(trajs)),
        "unparseable_rate": _ratio(sum(t.status == "unparseable" for t in turns), len(turns)),
        "timeout_rate": _ratio(sum(t.status == "timeout" for t in turns), len(turns)),
        "ended_early": sum(solved_turn(t, max_turns) is None and len(t.turns) < max_turns for t in trajs),
        **pass_at_k_metrics(trajs),
        **length_metrics(trajs, max_turns),
        "per_problem": succ["per_problem"],
    }
    return out
