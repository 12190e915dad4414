"""Returns and per-group importance weights (the pure core of DRIFT), and `drift weights`.

Return of one trajectory (every term configurable):
    R = sum_t gamma^(t-1) * r_t  +  format_penalty * (#unparseable turns)
        + timeout_penalty * (#timed-out turns)  -  repeat_penalty * (1 - unique_answers / answered_turns)
r_t = 1 if turn t is correct else 0. A turn whose check timed out is not a format error: the
answer was there, the checker gave no verdict in time. By default (timeout_penalty 0) it only
earns no reward, so a slow or stuck checker does not move the weights. Reference-format rows
carry their summed format penalty themselves; it is used as stored.

Weights of one prompt group with returns R_1..R_N:
    drift:  w_i = exp(R_i/beta) / ((1/N) sum_j exp(R_j/beta))   (mean 1; max subtracted first)
    sft:    w_i = 1
    rft:    w_i = 1 if trajectory i was solved else 0
    refit:  w_i = R_i                                            (R_i >= 0 required)
    swift:  w_i = (R_i - mean(R)) / (std(R) + eps)              (population std, eps = 1e-6)
`beta = "auto"` picks one beta for the whole run from the training returns: the mean, over the
groups whose returns are not all equal, of ESS/N (ESS = (sum w)^2 / sum w^2, N = group size)
is set to `ess_target` (default 0.25) by bisection on log beta. ESS/N = 1 / (N sum p_i^2) with
p = softmax(R / beta) rises monotonically with beta (from the share of the group's best
returns at beta -> 0 to 1 at beta -> infinity), so the search is exact up to its tolerance; a
target outside the reachable range takes the nearer end of [1e-4, 1e4]. The beta chosen and the
ESS/N reached are in the diagnostics; a target it cannot reach (n = 2: ESS/N >= 0.5 always) is
logged as a warning and recorded (`ess_target_met` false).
Rows are written in canonical order, (prompt_id, sample_idx), whatever order the rollout's
shards hold them in (a resumed rollout finishes its conversations in another order), so the same
trajectories always give the same bytes, and the same training.
Two kinds of groups may deserve no training, and they differ:
    unsolved:    no trajectory of the group succeeded (drift: the least bad failures get the
                 most weight; with equal returns, plain SFT on failures);
    degenerate:  all returns are equal, so the group carries no preference signal. All-success
                 groups are degenerate too, and they are exactly the positive data of rft, sft,
                 refit and DRIFT's clean imitation of correct answers.
The `degenerate` rule picks which groups get weight 0:
    keep           (default, the reference) the method's weights everywhere;
    drop_unsolved  groups with no success;
    drop_equal     groups whose returns are all equal (all-success groups included).
The diagnostics count both kinds of groups whatever the rule.

`prune = eps` (drift and refit, whose weights are >= 0 and can be negligible without being zero by
design): in each group, the smallest rows whose weights sum to at most eps of the group's total
are marked `"pruned": true` (`prune_group`). `drift train` does not compute them but keeps them
in the loss's normalizer and in the global batches, so a step's loss loses their terms only: at
most eps x the group's weight x the largest per-row loss. The diagnostics record `pruned_rows`,
`pruned_weight` and `pruned_weight_share`. Off by default: on mul, `train.min_weight` already
drops the same rows (docs/results.md, section 6).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import statistics
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from drift import DriftError
from drift.bounds import check_bounds, check_unit_interval
from drift.checkers import normalize_answer
from drift.config import option
from drift.ledger import Cost, measure
from drift.records import (ReturnInputs, WeightedRow, read_jsonl, require_complete, return_inputs,
                           trajectory_files, write_json, write_jsonl)
from drift.rundir import Lock, config_record, ensure_writable, file_record, read_record, record, weights_record

log = logging.getLogger(__name__)

METHODS = ("drift", "sft", "rft", "refit", "swift")
PRUNABLE = ("drift", "refit")  # weights >= 0 that can be negligible without being zero by design
STD_EPS = 1e-6  # added to a group's std before dividing by it (Swift, GRPO)


@dataclass
class ReturnConfig:
    gamma: float = option(0.9, "discount per turn: a success at turn t earns gamma^(t-1)")
    format_penalty: float = option(-0.1, "added to the return for every unparseable turn (drift format)")
    repeat_penalty: float = option(0.5, "lambda: subtract lambda * (1 - unique/answered) for repeated answers")
    timeout_penalty: float = option(0.0, "added to the return for every turn whose check timed out (drift format)")

    def check_returns(self) -> None:
        """The return keys' rules, for every stage that scores conversations (weights, online)."""
        for key in ("gamma", "format_penalty", "repeat_penalty", "timeout_penalty"):
            if not math.isfinite(getattr(self, key)):
                raise DriftError(f"config key '{key}' must be a finite number, got {getattr(self, key)}")
        check_unit_interval(self, "gamma")


def trajectory_return(x: ReturnInputs, cfg: ReturnConfig) -> float:
    """R = discounted success + format and timeout penalties - repeat penalty (see module docstring)."""
    discounted = sum(cfg.gamma ** t * r for t, r in enumerate(x.turn_rewards))
    fmt = x.format_penalty_sum if x.format_penalty_sum is not None else cfg.format_penalty * x.format_errors
    timeouts = cfg.timeout_penalty * x.timeouts
    answered = len(x.answer_norms)
    unique = len({normalize_answer(a) for a in x.answer_norms if a})
    repeat = cfg.repeat_penalty * (1.0 - unique / answered) if answered else 0.0
    return discounted + fmt + timeouts - repeat


def is_degenerate(returns: Sequence[float]) -> bool:
    return max(returns) - min(returns) <= 1e-12


def is_dropped(rule: str, degenerate: bool, solved: Sequence[bool]) -> bool:
    """Does the `degenerate` rule zero this group's weights?"""
    if rule == "drop_unsolved":
        return not any(solved)
    if rule == "drop_equal":
        return degenerate
    return False


def drift_weights(returns: Sequence[float], beta: float) -> list[float]:
    """exp(R/beta) normalized to mean 1 within the group, computed stably."""
    if beta <= 0:
        raise DriftError(f"beta must be > 0, got {beta}")
    top = max(returns)
    e = [math.exp((r - top) / beta) for r in returns]
    mean = sum(e) / len(e)
    return [v / mean for v in e]


BETA_RANGE = (1e-4, 1e4)


def ess_share(groups: Sequence[Sequence[float]], beta: float) -> float:
    """Mean over `groups` of ESS/N of DRIFT's weights at `beta`."""
    return statistics.fmean(effective_sample_size(drift_weights(g, beta)) / len(g) for g in groups)


def auto_beta(groups: Sequence[Sequence[float]], target: float) -> tuple[float, float | None]:
    """(beta, ESS/N reached): the beta at which the mean ESS/N of the groups with return spread is
    `target` (bisection on log beta; see the module docstring). Without such groups beta has no
    effect on the weights: (1.0, None)."""
    live = [g for g in groups if not is_degenerate(g)]
    if not live:
        return 1.0, None
    lo, hi = (math.log(b) for b in BETA_RANGE)
    if ess_share(live, math.exp(lo)) >= target:
        return math.exp(lo), ess_share(live, math.exp(lo))
    if ess_share(live, math.exp(hi)) <= target:
        return math.exp(hi), ess_share(live, math.exp(hi))
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ess_share(live, math.exp(mid)) < target else (lo, mid)
    beta = math.exp((lo + hi) / 2)
    return beta, ess_share(live, beta)


def spread(returns: Sequence[float]) -> float:
    """Population standard deviation of a group's returns."""
    mean = sum(returns) / len(returns)
    return math.sqrt(sum((r - mean) ** 2 for r in returns) / len(returns))


def standardized(returns: Sequence[float], eps: float = STD_EPS) -> list[float]:
    """(R - mean) / (population std + eps) within the group: Swift's weights, and the online
    arm's advantages with scale_by_std (GRPO)."""
    mean = sum(returns) / len(returns)
    std = spread(returns)
    return [(r - mean) / (std + eps) for r in returns]


def swift_weights(returns: Sequence[float]) -> list[float]:
    """(R - mean) / (population std + 1e-6) within the group."""
    return standardized(returns)


def refit_weights(returns: Sequence[float]) -> list[float]:
    if min(returns) < 0:
        raise ValueError("refit")
    return list(returns)


def group_weights(method: str, returns: Sequence[float], solved: Sequence[bool], beta: float) -> list[float]:
    """Weights of one prompt group. Pure; raises ValueError('refit') on negative refit returns."""
    if method == "drift":
        return drift_weights(returns, beta)
    if method == "sft":
        return [1.0] * len(returns)
    if method == "rft":
        return [1.0 if s else 0.0 for s in solved]
    if method == "refit":
        return refit_weights(returns)
    if method == "swift":
        return swift_weights(returns)
    raise DriftError(f"unknown weighting method {method!r}; choose one of {', '.join(METHODS)}")


def prune_group(weights: Sequence[float], eps: float) -> list[bool]:
    """Which rows of one group to prune: the smallest rows whose weights sum to at most eps of the
    group's total (ties in input order; weights >= 0). An all-zero group is pruned whole. The
    pruned rows stay in the training loss's normalizer (`drift.train`), so the loss changes by
    their terms only: at most eps x the group's weight x the largest per-row loss."""
    if min(weights, default=0.0) < 0:
        raise ValueError("prune")
    budget = eps * sum(weights)
    pruned, spent = [False] * len(weights), 0.0
    for i in sorted(range(len(weights)), key=lambda i: weights[i]):
        if spent + weights[i] > budget:
            break
        spent += weights[i]
        pruned[i] = True
    return pruned


def effective_sample_size(weights: Sequence[float]) -> float:
    """(sum w)^2 / sum w^2; 0 for an all-zero group."""
    sq = sum(w * w for w in weights)
    return (sum(weights) ** 2) / sq if sq > 0 else 0.0


@dataclass
class WeightsConfig(ReturnConfig):
    input: str = option("", "trajectories: a drift JSONL file or shard directory, or reference-format JSONL", result=False)
    output: str = option("", "where to write the weighted JSONL (every input row + 'return' and 'weight')", result=False)
    method: Literal["drift", "sft", "rft", "refit", "swift"] = option("drift", "weighting method")
    beta: float | Literal["auto"] = option(0.1, "DRIFT temperature: w ∝ exp(R/beta); auto: the beta whose mean "
                                           "ESS/N over groups with return spread is ess_target")
    ess_target: float = option(0.25, "beta = auto: the mean ESS/N (0 < target < 1) to reach")
    degenerate: Literal["keep", "drop_unsolved", "drop_equal"] = option(
        "keep", "which groups get weight 0: keep (none, the reference), drop_unsolved (groups with no success), "
        "drop_equal (groups whose returns are all equal, all-success groups included)")
    prune: float = option(0.0, "drift, refit: mark the smallest rows of each group whose weights sum to at most "
                          "this share of the group's total (e.g. 1e-3) as pruned: not trained, still in the "
                          "loss's normalizer; 0: none")
    skip_bad_rows: bool = option(False, "skip (and count) malformed lines instead of stopping")

    def __post_init__(self) -> None:
        self.check_returns()
        if self.beta != "auto":
            check_bounds(self, ("beta",), also="auto")
        if not (math.isfinite(self.ess_target) and 0 < self.ess_target < 1):
            raise DriftError(f"ess_target must be in (0, 1), got {self.ess_target}")
        if not (math.isfinite(self.prune) and 0 <= self.prune < 1):
            raise DriftError(f"prune must be in [0, 1), got {self.prune}")

    @property
    def returns(self) -> ReturnConfig:
        return ReturnConfig(**{k: getattr(self, k) for k in ReturnConfig.__dataclass_fields__})


def _input_files(path: str) -> list[Path]:
    """The input's files (`records.trajectory_files`); a rollout that did not finish is refused."""
    files, manifest = trajectory_files(path)
    require_complete(path, manifest)
    return files


def compute(cfg: WeightsConfig) -> tuple[list[WeightedRow], dict]:
    """Read the input, return (the weighted rows, diagnostics)."""
    rows: list[WeightedRow] = []
    where: list[str] = []
    first_seen: dict[tuple[str, object], str] = {}  # (prompt_id, sample_idx) -> where it was read
    skipped = 0
    for f in _input_files(cfg.input):
        lines = read_jsonl(f, skip_bad=cfg.skip_bad_rows)
        for lineno, row in lines:
            loc = f"{f}:{lineno}"
            if row is None:
                skipped += 1
                continue
            try:
                if "prompt_id" not in row or row["prompt_id"] in (None, ""):
                    raise DriftError(f"{loc}: missing field 'prompt_id'")
                ret = trajectory_return(return_inputs(row, loc), cfg.returns)
            except DriftError:
                if cfg.skip_bad_rows:
                    skipped += 1
                    continue
                raise
            if not math.isfinite(ret):
                raise DriftError(f"{loc}: non-finite return {ret} (group {row['prompt_id']!r})")
            if "sample_idx" in row:
                key = (str(row["prompt_id"]), row["sample_idx"])
                if key in first_seen:
                    raise DriftError(f"{loc}: duplicate trajectory (prompt_id={key[0]!r}, sample_idx={key[1]!r}), "
                                     f"also at {first_seen[key]}")
                first_seen[key] = loc
            rows.append(WeightedRow({k: v for k, v in row.items() if k != "pruned"}, 0.0, ret))
            where.append(loc)
    if not rows:
        raise DriftError(f"{cfg.input}: no rows to weight (empty input)")
    order = sorted(range(len(rows)), key=lambda i: canonical_key(rows[i]))
    rows, where = [rows[i] for i in order], [where[i] for i in order]

    groups: OrderedDict[str, list[int]] = OrderedDict()
    for i, row in enumerate(rows):
        groups.setdefault(str(row.fields["prompt_id"]), []).append(i)
    beta, reached = cfg.beta, None
    if beta == "auto":
        beta, reached = auto_beta([[rows[i].ret for i in idx] for idx in groups.values()], cfg.ess_target)
        if reached is not None and not target_met(reached, cfg.ess_target):
            log.warning("weights: beta auto cannot reach the ESS/N target %g on these groups: it took beta %.4g, the "
                        "end of its range [%g, %g], where ESS/N is %.3g", cfg.ess_target, beta, *BETA_RANGE, reached)
    per_group = []
    for pid, idx in groups.items():
        rets = [rows[i].ret for i in idx]
        solved = [rows[i].success_turn is not None for i in idx]
        degenerate = is_degenerate(rets)
        try:
            ws = group_weights(cfg.method, rets, solved, beta)
        except ValueError:
            bad = next(i for i in idx if rows[i].ret < 0)
            raise DriftError(
                f"{where[bad]}: refit needs returns >= 0, but this trajectory's return is {rows[bad].ret:.4g} "
                "(penalties make returns negative: use --format-penalty 0 --repeat-penalty 0 with refit)") from None
        dropped = is_dropped(cfg.degenerate, degenerate, solved)
        if dropped:
            ws = [0.0] * len(ws)
        pruned = prune_group(ws, cfg.prune) if cfg.prune > 0 and cfg.method in PRUNABLE else [False] * len(ws)
        for i, w, p in zip(idx, ws, pruned):
            rows[i].weight, rows[i].pruned = w, p
        per_group.append({"prompt_id": pid, "size": len(idx), "degenerate": degenerate, "unsolved": not any(solved),
                          "dropped": dropped, "ess": effective_sample_size(ws), "max_weight": max(ws),
                          "solved": sum(solved), "pruned": sum(pruned),
                          "pruned_weight": sum(w for w, p in zip(ws, pruned) if p)})
    return rows, diagnostics(cfg, rows, per_group, skipped, beta, reached)


def canonical_key(row: WeightedRow) -> tuple[str, int]:
    """(prompt_id, sample_idx): the order rows are written in; rows without a sample_idx (the
    reference's format) keep their order within their group."""
    idx = row.fields.get("sample_idx")
    return str(row.fields["prompt_id"]), idx if isinstance(idx, int) else -1


def target_met(reached: float, target: float) -> bool:
    """Did beta auto's ESS/N reach its target (to the bisection's tolerance)?"""
    return abs(reached - target) <= 1e-6 * max(1.0, target)


def diagnostics(cfg: WeightsConfig, rows: list[WeightedRow], per_group: list[dict], skipped: int, beta: float,
                reached: float | None) -> dict:
    weights = [r.weight for r in rows]
    total_weight = sum(abs(w) for w in weights)
    ess = [g["ess"] for g in per_group]
    qs = statistics.quantiles(weights, n=10, method="inclusive") if len(weights) > 1 else weights * 9
    return {
        "method": cfg.method, "beta": beta, "beta_setting": cfg.beta, "ess_target": cfg.ess_target,
        "ess_share_reached": reached, "ess_target_met": None if reached is None else target_met(reached, cfg.ess_target),
        "gamma": cfg.gamma, "format_penalty": cfg.format_penalty,
        "repeat_penalty": cfg.repeat_penalty, "degenerate_rule": cfg.degenerate,
        "rows": len(rows), "skipped_rows": skipped, "groups": len(per_group),
        "degenerate_groups": sum(g["degenerate"] for g in per_group),
        "degenerate_share": sum(g["degenerate"] for g in per_group) / len(per_group),
        "unsolved_groups": sum(g["unsolved"] for g in per_group),
        "unsolved_share": sum(g["unsolved"] for g in per_group) / len(per_group),
        "dropped_groups": sum(g["dropped"] for g in per_group),
        "solved_share": sum(r.success_turn is not None for r in rows) / len(rows),
        "return_mean": statistics.fmean(r.ret for r in rows),
        "weight_sum": sum(weights), "weight_min": min(weights), "weight_max": max(weights),
        "weight_quantiles": {"p10": qs[0], "p50": qs[4], "p90": qs[8]},
        "rows_weight_below_1e-3": sum(abs(w) < 1e-3 for w in weights),
        "prune": cfg.prune, "pruned_rows": sum(g["pruned"] for g in per_group),
        "pruned_weight": sum(g["pruned_weight"] for g in per_group),
        "pruned_weight_share": (sum(g["pruned_weight"] for g in per_group) / total_weight) if total_weight else 0.0,
        "ess_mean": statistics.fmean(ess), "ess_min": min(ess), "ess_median": statistics.median(ess),
        "weight_share_by_success_turn": weight_share_by_success_turn(rows),
        "per_group": per_group,
    }


def weight_share_by_success_turn(rows: list[WeightedRow]) -> dict[str, float]:
    """The share of the total absolute weight on trajectories solved at each turn ("1", "2", ...)
    and on unsolved ones ("unsolved"): what the training data teaches at each turn (absolute,
    because Swift's weights sum to zero per group). gamma < 1 moves weight to early successes,
    and a turn with little weight is a turn the model hardly learns."""
    by: dict[str, float] = {}
    for r in rows:
        t = r.success_turn
        key = "unsolved" if t is None else str(t)
        by[key] = by.get(key, 0.0) + abs(r.weight)
    total = sum(by.values())
    order = sorted((k for k in by if k != "unsolved"), key=int) + (["unsolved"] if "unsolved" in by else [])
    return {k: by[k] / total if total else 0.0 for k in order}


def run_weights(cfg: WeightsConfig) -> dict:
    """`drift weights`: write the weighted rows and `<output stem>.weights.json` diagnostics."""
    if not cfg.input or not cfg.output:
        raise DriftError("drift weights needs an input and --output")
    ensure_writable(cfg.output, is_file=True)
    out = Path(cfg.output)
    with Lock(out, is_file=True):
        cost = Cost()
        with measure(cost):
            rows, diag = compute(cfg)
            weights_record(out).unlink(missing_ok=True)  # never an old record beside new rows
            write_jsonl(out, (r.to_json() for r in rows))
        diag = {**stage_record(cfg, trajectory_files(cfg.input)[1]), "status": "complete", **diag, "cost": cost.to_json(),
                "files": file_record(out.parent, [out])}
        write_json(weights_record(out), diag)
    return diag


def union(parts: list[Path], output: Path) -> dict:
    """The weighted rows of several rounds as one training input: `output/` holds a link to each
    part (each already weighted within its own round's groups), and `weights_record(output)` a
    record naming every part's record. Returns that record."""
    records = [read_record(weights_record(p)) for p in parts]
    if any(r is None or r.get("status") != "complete" for r in records):
        raise DriftError(f"union: every part needs a finished weights record ({', '.join(map(str, parts))})")
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir(parents=True)
    for k, p in enumerate(parts, 1):
        target = output / f"part-{k:03d}.jsonl"
        try:
            os.link(p, target)
        except OSError:  # another filesystem: copy
            shutil.copyfile(p, target)
    rec = union_record(records, output)
    write_json(weights_record(output), {**rec, "status": "complete", "parts": [str(p) for p in parts],
                                        "rows": sum(r["rows"] for r in records)})
    return rec


def union_record(part_records: list[dict], output: Path) -> dict:
    """The record of a union of weighted parts: its settings name the parts' digests in order."""
    return record("weights", {"union_of": [r.get("digest") for r in part_records]}, part_records[-1], output)


def stage_record(cfg: WeightsConfig, rollout_record: dict | None) -> dict:
    """The weights stage's record (`drift.rundir`): its settings and the rollout it weighted."""
    return config_record("weights", cfg, rollout_record, cfg.input)


def diagnostics_table(diag: dict) -> list[tuple[str, str]]:
    """(name, value) pairs for printing."""
    q = diag["weight_quantiles"]
    return [
        ("method", f"{diag['method']} (beta {diag['beta']:.4g}"
                   + (f", auto: ESS/N {diag['ess_share_reached']}" if diag["beta_setting"] == "auto" else "")
                   + (" NOT the target: the end of its range" if diag["ess_target_met"] is False else "")
                   + f", gamma {diag['gamma']})"),
        ("rows / groups", f"{diag['rows']} / {diag['groups']}" + (f"  ({diag['skipped_rows']} skipped)" if diag["skipped_rows"] else "")),
        ("solved trajectories", f"{diag['solved_share']:.1%}"),
        ("mean return", f"{diag['return_mean']:.4f}"),
        ("degenerate groups (returns all equal)", f"{diag['degenerate_groups']} ({diag['degenerate_share']:.1%})"),
        ("unsolved groups (no success)", f"{diag['unsolved_groups']} ({diag['unsolved_share']:.1%})"),
        ("groups dropped", f"{diag['dropped_groups']} (rule: {diag['degenerate_rule']})"),
        ("ESS per group", f"mean {diag['ess_mean']:.2f}, min {diag['ess_min']:.2f}, median {diag['ess_median']:.2f}"),
        ("weight min / p10 / p50 / p90 / max", f"{diag['weight_min']:.4g} / {q['p10']:.4g} / {q['p50']:.4g} / {q['p90']:.4g} / {diag['weight_max']:.4g}"),
        ("rows with |weight| < 1e-3", str(diag["rows_weight_below_1e-3"])),
        ("rows pruned (not trained, in the normalizer)", f"{diag['pruned_rows']} ({diag['pruned_weight_share']:.3g} of "
                                                         f"the weight; prune {diag['prune']:g})"),
        ("weight share by success turn", ", ".join(
            f"{'unsolved' if k == 'unsolved' else 'turn ' + k} {v:.1%}" for k, v in diag["weight_share_by_success_turn"].items())),
    ]
