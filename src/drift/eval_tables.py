"""The correction tables and figure of eval runs, for metrics.md and `drift compare` (`drift.metrics`
defines each measure). Rates are percent with their 95% interval in brackets; every paired test is
against the first run of the same protocol, on the problems both runs scored."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from drift.metrics import paired_test

PROTOCOL_NAMES = {"oracle": "oracle feedback (the loop stops at the first correct answer)",
                  "no-oracle": "no oracle: a second attempt after every answer (SCoRe)",
                  "planted": "planted wrong first answer"}


def pct_ci(x: float | None, ci: Sequence[float] | None = None) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f}" + ("" if not ci else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]")


def _p(p: float | None) -> str:
    return "–" if p is None else f"{p:.2g}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"] + \
        ["| " + " | ".join(r) + " |" for r in rows]


def oracle_rows(runs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    head = ["run", "succ@T", "corrected at turn 2 after \"wrong\"", "enumeration succ@T"]
    rows = []
    for label, m in runs:
        T = m["max_turns"]
        corr = "–"
        if T >= 2 and m.get("correction_base", [0, 0])[1]:
            corr = (f"{m['corrected'][1]} of {m['correction_base'][1]}: " if "corrected" in m else "") + \
                pct_ci(m["correction_rate"][1], (m.get("correction_rate_ci") or [None, None])[1])
        enum = m.get("enumeration_baseline")
        rows.append([label, pct_ci(m["succ_at_k"][-1], (m.get("succ_at_k_ci") or [None])[-1]), corr,
                     pct_ci(enum[-1]) if enum else "–"])
    return _table(head, rows)


def planted_rows(runs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    head = ["run", "conversations", "correct at turn 2", "repeat the planted answer", "solved within T"]
    rows = [[label, str(p["conversations"]), pct_ci(p["correct_t2"], p["correct_t2_ci"]),
             pct_ci(p["repeat_t2"], p["repeat_t2_ci"]), pct_ci(p["solved"], p["solved_ci"])]
            for label, m in runs if (p := m.get("planted"))]
    return _table(head, rows)


def second_attempt_rows(runs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    head = ["run", "conversations", "Acc@t1", "Acc@t2", "Δ", "Δ i→c", "Δ c→i", "McNemar p (t2 vs t1)"]
    rows = [[label, str(s["conversations"]), pct_ci(s["acc_t1"], s["acc_t1_ci"]), pct_ci(s["acc_t2"], s["acc_t2_ci"]),
             pct_ci(s["delta"], s["delta_ci"]), pct_ci(s["delta_i_to_c"]), pct_ci(s["delta_c_to_i"]), _p(s["mcnemar_p"])]
            for label, m in runs if (s := m.get("second_attempt"))]
    return _table(head, rows)


def pass_vs_succ_rows(runs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    rows = [[label, str(r["k"]), pct_ci(r["pass"], r["pass_ci"]), pct_ci(r["succ"], r["succ_ci"])]
            for label, m in runs for r in m.get("pass_vs_succ") or []]
    return _table(["run", "k", "pass@k (k independent turn-1 samples)", "succ@k (k sequential attempts)"], rows) \
        if rows else []


def paired_values(m: dict[str, Any]) -> dict[str, float]:
    """The per-problem outcome a protocol's paired test compares: the planted or second-attempt
    turn-2 rate, or succ@T."""
    for key in ("planted", "second_attempt"):
        if m.get(key):
            return m[key]["per_problem_t2"]
    return {p: v[-1] for p, v in (m.get("per_problem") or {}).items() if v}


def paired_rows(runs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    base_label, base = runs[0]
    rows = []
    for label, m in runs[1:]:
        r = paired_test(paired_values(base), paired_values(m))
        if r is None:
            rows.append([label, "0", "–", "–", "–"])
            continue
        diff = f"{100 * r['diff']:+.1f}" + ("" if r["se"] is None else f" ± {100 * r['se']:.1f}")
        counts = "–" if r["b_only"] is None else f"{r['b_only']} / {r['a_only']}"
        rows.append([label, str(r["shared"]), diff, counts, _p(r["mcnemar_p"])])
    return _table([f"run (against {base_label})", "shared problems", "difference (points ± paired se)",
                   "only this run / only the first", "McNemar p"], rows)


def correction_tables(metrics: Sequence[dict[str, Any]], labels: Sequence[str]) -> str:
    """Per protocol present: its table, and the paired tests against its first run."""
    parts = []
    for protocol, render in (("oracle", oracle_rows), ("planted", planted_rows), ("no-oracle", second_attempt_rows)):
        runs = [(label, m) for label, m in zip(labels, metrics) if m.get("protocol", "oracle") == protocol]  # as protocol_of
        if not runs:
            continue
        parts += [f"### {PROTOCOL_NAMES[protocol]}", ""] + render(runs) + [""]
        if len(runs) > 1:
            what = {"oracle": "succ@T", "planted": "correct at turn 2", "no-oracle": "Acc@t2"}[protocol]
            parts += [f"Paired test of {what}:", ""] + paired_rows(runs) + [""]
    equal = pass_vs_succ_rows(list(zip(labels, metrics)))
    if equal:
        parts += ["### equal samples: pass@k beside succ@k", ""] + equal + [""]
    return "\n".join(parts)


def correction_bars(metrics: Sequence[dict[str, Any]], labels: Sequence[str]) -> list[tuple[str, str, float, list]]:
    """(run, measure, rate, interval) of every planted and no-oracle run: what `plot_correction` draws."""
    bars = []
    for label, m in zip(labels, metrics):
        if p := m.get("planted"):
            bars += [(label, "planted: correct at turn 2", p["correct_t2"], p["correct_t2_ci"]),
                     (label, "planted: repeats it", p["repeat_t2"], p["repeat_t2_ci"])]
        if s := m.get("second_attempt"):
            bars += [(label, "no oracle: Acc@t1", s["acc_t1"], s["acc_t1_ci"]),
                     (label, "no oracle: Acc@t2", s["acc_t2"], s["acc_t2_ci"])]
    return bars


def plot_correction(metrics: Sequence[dict[str, Any]], labels: Sequence[str], output_png: str | Path) -> bool:
    """A bar per run and measure with its 95% interval; False (nothing drawn) when no run has one."""
    bars = correction_bars(metrics, labels)
    if not bars:
        return False
    from matplotlib import colormaps  # as plot_succ_at_k: scoring alone never loads matplotlib
    from matplotlib.figure import Figure

    measures = list(dict.fromkeys(b[1] for b in bars))
    runs = list(dict.fromkeys(b[0] for b in bars))
    colors = colormaps["tab20" if len(runs) > 10 else "tab10"]  # one colour per run, up to 20
    fig = Figure(figsize=(8.5, 4), dpi=120)
    ax = fig.add_subplot()
    width = 0.8 / len(runs)
    for j, run in enumerate(runs):
        xs, ys, lo, hi = [], [], [], []
        for i, measure in enumerate(measures):
            for r, mm, rate, ci in bars:
                if r == run and mm == measure:
                    xs.append(i + (j - (len(runs) - 1) / 2) * width)
                    ys.append(100 * rate)
                    lo.append(100 * (rate - ci[0]) if ci else 0.0)
                    hi.append(100 * (ci[1] - rate) if ci else 0.0)
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=run, color=colors(j % colors.N))
    ax.set_xticks(range(len(measures)), measures, rotation=15, fontsize=8)
    ax.set_ylabel("percent (95% interval)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars, never over them
    fig.tight_layout()
    out = Path(output_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return True
