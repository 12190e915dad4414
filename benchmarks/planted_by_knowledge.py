"""Split the planted probe by what each model knows: correct at turn 2 after a planted wrong answer,
among the facts the same model answers right at turn 1 of its own oracle evaluation, and among
the others. Each MODEL is `LABEL=ORACLE_EVAL_DIR,PLANTED_EVAL_DIR` (two `drift eval` outputs of
one model on the same held-out problems):

    python benchmarks/planted_by_knowledge.py base=runs/oc-s0/eval/base,runs/oc-planted \\
        drift=runs/oc-s0/eval/drift,runs/oc-s0/probe/drift

A model that corrects more planted answers only because it knows more facts gains in the first
column's count, not in its rate; a model that learned to move off a wrong answer gains in the rate.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from drift.eval_tables import pct_ci
from drift.stats import wilson


def split(oracle_dir: str, planted_dir: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """((corrected, known), (corrected, unknown)) over the problems both evaluations hold."""
    known = {p: v[0] > 0 for p, v in json.loads((Path(oracle_dir) / "metrics.json").read_text())["per_problem"].items()}
    planted = json.loads((Path(planted_dir) / "metrics.json").read_text())["per_problem"]
    out = {True: [0, 0], False: [0, 0]}
    for pid, v in planted.items():
        if pid in known:
            out[known[pid]][0] += v[1] > 0  # right at turn 2 (turn 1 is the planted answer)
            out[known[pid]][1] += 1
    return tuple(out[True]), tuple(out[False])


def main(specs: list[str]) -> None:
    print("| model | knows the fact: corrected at turn 2 | rate [95%] | does not: corrected | rate [95%] |")
    print("|---|---:|---:|---:|---:|")
    for spec in specs:
        label, dirs = spec.split("=", 1)
        (ck, nk), (cu, nu) = split(*dirs.split(","))
        rate = lambda c, n: pct_ci(c / n, wilson(c, n)) if n else "–"  # noqa: E731
        print(f"| {label} | {ck} of {nk} | {rate(ck, nk)} | {cu} of {nu} | {rate(cu, nu)} |")


if __name__ == "__main__":
    main(sys.argv[1:])
