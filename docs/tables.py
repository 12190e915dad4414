"""Print the tables of docs/results.md from finished `drift run` directories (one per seed).

    python docs/tables.py runs/mul-s0 runs/mul-s1 --against drift

Table 1: per arm, succ@k averaged over the run directories (each seed's value in brackets),
the unique-answer ratio over conversations that got feedback, and the training cost (tokens
processed = every real token of every epoch, the load-independent cost; wall time depends on load).
Table 2: paired differences at the last turn, `against` minus each other arm: per held-out
problem the difference is averaged over seeds, then mean ± standard error over problems; then
the mean difference of each seed (the spread between seeds, which the standard error over
problems does not include).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from drift.metrics import mean_and_se
from drift.rundir import RunDir, read_record


def load(run: Path) -> dict[str, dict]:
    d = RunDir(run)
    arms = {}
    for arm in d.evaluated():
        metrics = read_record(d.eval(arm).metrics)
        if metrics is not None:
            arms[arm] = {"metrics": metrics, "train": read_record(d.train(arm).summary)}
    return arms


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def summary_table(runs: list[dict[str, dict]]) -> str:
    arms = [a for a in runs[0] if all(a in r for r in runs)]
    turns = len(runs[0][arms[0]]["metrics"]["succ_at_k"])
    head = "| arm | " + " | ".join(f"succ@{k + 1}" for k in range(turns))
    head += " | unique (≥2 turns) | rows trained | tokens processed | tokens trained | train wall time (s) |\n"
    head += "|---|" + "---:|" * (turns + 5) + "\n"
    lines = []
    for arm in arms:
        cells = []
        for k in range(turns):
            vals = [r[arm]["metrics"]["succ_at_k"][k] for r in runs]
            each = " / ".join(pct(v) for v in vals)
            cells.append(f"{pct(sum(vals) / len(vals))} ({each})" if len(vals) > 1 else pct(vals[0]))
        uniq = [r[arm]["metrics"]["unique_ratio_multi_turn"] for r in runs]
        uniq = [u for u in uniq if u is not None]
        cells.append(f"{sum(uniq) / len(uniq):.2f}" if uniq else "–")
        trains = [r[arm]["train"] for r in runs if r[arm]["train"]]
        if trains:
            cells.append(" / ".join(str(t["data"]["rows_used"]) for t in trains))
            cells.append(" / ".join(f"{t['tokens']:,}" for t in trains))
            cells.append(" / ".join(f"{t['trained_tokens']:,}" for t in trains))
            cells.append(" / ".join(f"{t['seconds']:.0f}" for t in trains))
        else:
            cells += ["–"] * 4
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def paired_table(runs: list[dict[str, dict]], against: str) -> str:
    arms = [a for a in runs[0] if a != against and all(a in r for r in runs)]
    lines = [f"| {against} minus | succ@T difference (points) | ± s.e. | each seed | problems |",
             "|---|---:|---:|---:|---:|"]
    problems = list(runs[0][against]["metrics"]["per_problem"])
    for arm in arms:
        per_seed = [[r[against]["metrics"]["per_problem"][pid][-1] - r[arm]["metrics"]["per_problem"][pid][-1]
                     for pid in problems] for r in runs]  # per run: one difference per held-out problem
        diffs = [sum(d) / len(d) for d in zip(*per_seed)]
        mean, se = mean_and_se(diffs)
        each = " / ".join(f"{100 * sum(d) / len(d):+.1f}" for d in per_seed)
        lines.append(f"| {arm} | {100 * mean:+.1f} | {100 * (se or 0.0):.1f} | {each} | {len(diffs)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="`drift run` output directories, one per seed")
    p.add_argument("--against", default="drift", help="arm whose paired differences are reported")
    args = p.parse_args()
    runs = [load(r) for r in args.runs]
    for path, arms in zip(args.runs, runs):
        if not arms:
            p.error(f"{path}: no evaluation finished (not a `drift run` directory)")
    print(summary_table(runs))
    if all(args.against in r for r in runs):
        print(paired_table(runs, args.against))


if __name__ == "__main__":
    main()
