"""Print the tables of docs/results.md from `drift run` directories (one per seed), and draw the
succ@T-against-cost figure.

    python docs/tables.py runs/ovd-s0 runs/ovd-s1 runs/ovd-s2 --against drift --figure docs/figures/x.png

Every run directory is read back through `drift.pipeline.load_run` (its config.json and the records
of its steps), so the numbers are the records' own. Rows are the arms' held-out evaluations; an
iterated arm gives one row per round (`drift@1`, `drift@2`, ...; its last round is the arm itself).

Table 1, per row: succ@k (mean over the run directories, each seed's value in brackets), the
correction rate after oracle feedback (over turns >= 2: answers corrected / answers that were parsed
and wrong at the turn before; the loop stops at the first correct answer, so the feedback is an
oracle's), the same pooled over seeds as a count with its 95% Wilson interval, the unique-answer
ratio over conversations that got feedback, and the
training budget from the cost ledger (trained tokens, FLOPs and wall seconds: the shared rollout in full, weights
and training, every earlier round; an online arm's rollouts and updates; evaluation excluded).
On multiple choice a last row gives the enumeration baseline (k / options: never repeat a letter).
Table 2: paired differences at the last turn, `against` minus each other row: per held-out
problem the difference is averaged over seeds, then mean ± standard error over problems; then
the mean difference of each seed (the spread between seeds, which the error over problems omits);
then, pooled over seeds, the problems only `against` solved / only the row solved and the exact
McNemar p on them.
Table 3 (online arms): the learning curve, succ@T and cumulative FLOPs at every evaluation.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from drift.arms import OnlineArm
from drift.ledger import Cost
from drift.metrics import mean_and_se
from drift.stats import mcnemar_exact, wilson
from drift.pipeline import load_run


def rows_of(path: Path) -> dict[str, dict[str, Any]]:
    """Row name -> {"arm", "metrics", "cost", "curve"} for one run directory, as the arms give
    them (labels included). An online arm stopped before its end gives one row per held-out
    evaluation of its curve (`online@30`: after iteration 30), with the cost up to that evaluation."""
    cfg, recs = load_run(path)
    rows = {}
    for arm in cfg.evaluated_arms():
        curve = arm.curve(recs) if isinstance(arm, OnlineArm) else None
        rows.update({r.label: {"arm": arm.name, "metrics": recs[r.step], "cost": arm.cost(recs, r.round),
                               "curve": curve} for r in arm.rows(recs)})
        if isinstance(arm, OnlineArm) and arm.name not in rows and curve:
            for i, point in enumerate(curve):
                rows[arm.curve_label(point)] = {"arm": arm.name, "metrics": arm.curve_metrics(cfg.dir, point),
                                                "cost": Cost.from_json(point["cost"]), "curve": curve[:i + 1]}
    return rows


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def correction(m: dict[str, Any]) -> float | None:
    """Answers corrected after feedback / answers parsed and wrong at the turn before, over turns >= 2."""
    base = sum(m["correction_base"][1:])
    fixed = sum(r * b for r, b in zip(m["correction_rate"][1:], m["correction_base"][1:]) if r is not None)
    return fixed / base if base else None


def corrected_counts(m: dict[str, Any]) -> tuple[int, int]:
    """(answers corrected, answers parsed and wrong at the turn before), over turns >= 2."""
    base = sum(m["correction_base"][1:])
    fixed = sum(r * b for r, b in zip(m["correction_rate"][1:], m["correction_base"][1:]) if r is not None)
    return round(fixed), base


def pooled_correction(ms: list[dict[str, Any]]) -> str:
    """The correction counts pooled over seeds, 'k of n [low, high]' (95% Wilson interval)."""
    k, n = (sum(c) for c in zip(*(corrected_counts(m) for m in ms)))
    ci = wilson(k, n)
    return "–" if ci is None else f"{k} of {n} [{pct(ci[0])}, {pct(ci[1])}]"


def _each(values: list[float | None], fmt: Any) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    mean = fmt(sum(vals) / len(vals))
    return f"{mean} ({' / '.join(fmt(v) for v in vals)})" if len(vals) > 1 else mean


def summary_table(runs: list[dict[str, dict]]) -> str:
    names = [n for n in runs[0] if all(n in r for r in runs)]
    turns = len(runs[0][names[0]]["metrics"]["succ_at_k"])
    head = ("| arm | " + " | ".join(f"succ@{k + 1}" for k in range(turns))
            + " | correction after oracle feedback | pooled | unique (≥2 turns) | trained tokens | training FLOPs"
            + " | training wall s |\n" + "|---|" + "---:|" * (turns + 6) + "\n")
    lines = []
    for n in names:
        ms = [r[n]["metrics"] for r in runs]
        cells = [_each([m["succ_at_k"][k] for m in ms], pct) for k in range(turns)]
        cells.append(_each([correction(m) for m in ms], pct))
        cells.append(pooled_correction(ms))
        cells.append(_each([m["unique_ratio_multi_turn"] for m in ms], lambda v: f"{v:.2f}"))
        costs = [r[n]["cost"] for r in runs]
        cells.append(_each([c.trained_tokens or None for c in costs], lambda v: f"{v:,.0f}"))
        cells.append(_each([c.flops or None for c in costs], lambda v: f"{v:.3g}"))
        cells.append(_each([c.wall_seconds or None for c in costs], lambda v: f"{v:.0f}"))
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    enum = runs[0][names[0]]["metrics"].get("enumeration_baseline")
    if enum:
        lines.append("| never repeat a letter (k / options) | " + " | ".join(pct(v) for v in enum[:turns])
                     + " |" + " – |" * 6)
    return head + "\n".join(lines) + "\n"


def paired_table(runs: list[dict[str, dict]], against: str) -> str:
    names = [n for n in runs[0] if n != against and all(n in r for r in runs)]
    lines = [f"| {against} minus | succ@T difference (points) | ± s.e. | each seed | problems "
             f"| only {against} / only the row | McNemar p |", "|---|---:|---:|---:|---:|---:|---:|"]
    problems = list(runs[0][against]["metrics"]["per_problem"])
    for n in names:
        per_seed = [[r[against]["metrics"]["per_problem"][pid][-1] - r[n]["metrics"]["per_problem"][pid][-1]
                     for pid in problems] for r in runs]  # per run: one difference per held-out problem
        diffs = [sum(d) / len(d) for d in zip(*per_seed)]
        mean, se = mean_and_se(diffs)
        each = " / ".join(f"{100 * sum(d) / len(d):+.1f}" for d in per_seed)
        only = [sum(x > 0 for x in d) for d in per_seed], [sum(x < 0 for x in d) for d in per_seed]
        b, c = sum(only[0]), sum(only[1])  # succ@T is 0 or 1 per problem with one greedy sample
        lines.append(f"| {n} | {100 * mean:+.1f} | {100 * (se or 0.0):.1f} | {each} | {len(diffs)} "
                     f"| {b} / {c} | {mcnemar_exact(b, c):.2g} |")
    return "\n".join(lines) + "\n"


def curve_table(runs: list[dict[str, dict]]) -> str:
    out = []
    names = list(runs[0])
    for i, n in enumerate(names):
        curves = [r[n]["curve"] for r in runs if n in r and r[n]["curve"]]
        if not curves or any(runs[0][m]["arm"] == runs[0][n]["arm"] for m in names[i + 1:]):
            continue  # a stopped arm's curve is printed once, with its last row
        out += [f"| {n}: iteration | succ@T per seed | training FLOPs per seed |", "|---:|---:|---:|"]
        for i, point in enumerate(curves[0]):
            succ = " / ".join(pct(c[i]["succ_at_k"][-1]) for c in curves if i < len(c))
            flops = " / ".join(f"{Cost.from_json(c[i]['cost']).flops:.3g}" for c in curves if i < len(c))
            out.append(f"| {point['iteration']} | {succ} | {flops} |")
        out.append("")
    return "\n".join(out)


def figure(runs: list[dict[str, dict]], output: Path) -> None:
    """Held-out succ@T against training FLOPs, every seed: an untrained row as a dotted level, an
    online arm as its learning curve, an iterated arm's rounds joined in order, other rows as points."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=120)
    ax = fig.add_subplot()
    markers = "osD^v<>P*X"
    arms = list(dict.fromkeys(row["arm"] for row in runs[0].values()))
    for j, arm in enumerate(arms):
        color = f"C{j % 10}"
        for s, r in enumerate(runs):
            names = [n for n, row in r.items() if row["arm"] == arm]
            if not names:
                continue
            label, marker = (arm if s == 0 else None), markers[s % len(markers)]
            last = r[names[-1]]
            if last["cost"].flops == 0:
                ax.axhline(100 * last["metrics"]["succ_at_k"][-1], color=color, linestyle=":", label=label)
            elif last["curve"]:
                xs = [Cost.from_json(p["cost"]).flops for p in last["curve"]]
                ys = [100 * p["succ_at_k"][-1] for p in last["curve"]]
                ax.plot(xs, ys, color=color, marker=marker, markersize=3, label=label)
            else:
                xs = [r[n]["cost"].flops for n in names]
                ys = [100 * r[n]["metrics"]["succ_at_k"][-1] for n in names]
                ax.plot(xs, ys, color=color, marker=marker, linestyle="-" if len(names) > 1 else "", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (rollouts + training; evaluation excluded)")
    ax.set_ylabel("held-out succ@T (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="`drift run` output directories, one per seed")
    p.add_argument("--against", default="drift", help="row whose paired differences are reported")
    p.add_argument("--figure", type=Path, help="also draw succ@T against training FLOPs to this PNG")
    args = p.parse_args()
    runs = [rows_of(r) for r in args.runs]
    for path, rows in zip(args.runs, runs):
        if not rows:
            p.error(f"{path}: no evaluation finished (not a `drift run` directory)")
    print(summary_table(runs))
    if all(args.against in r for r in runs):
        print(paired_table(runs, args.against))
    curves = curve_table(runs)
    if curves:
        print(curves)
    if args.figure:
        figure(runs, args.figure)
        print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
