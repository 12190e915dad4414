"""report.md, succ_at_k.png and cost.png for a pipeline run, and the demo's console summary.

Everything comes from the records the stages wrote (`drift.rundir`), read through `RunDir`:
the settings shown are each artifact's own, not the config of the latest command.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Protocol

from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from drift.arms import BASE, Arm, OfflineArm, OnlineArm, Records, ResultRow, StepId
from drift.env import ENVIRONMENT_KEYS, EnvConfig
from drift.eval_tables import correction_tables
from drift.evaluate import load_metrics, markdown_table, plot_succ_at_k
from drift.ledger import Cost
from drift.records import Trajectory, read_trajectories
from drift.rundir import RunDir

EXAMPLES = 3
SETUP_KEYS = ("model", "tasks", "split", "num_problems", "n", "max_turns", "temperature", "top_p", "max_new_tokens",
              "dtype", "seed")


class Run(Protocol):
    """What the report reads of a run (`drift.pipeline.RunConfig`): its title, directory and arms."""

    title: str

    @property
    def dir(self) -> RunDir: ...

    def evaluated_arms(self) -> list[Arm]: ...


def _trained(run: Run) -> list[Arm]:
    return [a for a in run.evaluated_arms() if a.name != BASE]


def result_rows(run: Run, recs: Records) -> list[ResultRow]:
    """Every finished held-out evaluation of a run, in order (see `Arm.rows`)."""
    return [row for arm in run.evaluated_arms() for row in arm.rows(recs)]


def rounds_table(run: Run, recs: Records) -> str:
    """Each iterated arm's held-out succ@k after every round, with the cumulative cost of the rounds."""
    parts = []
    for a in _trained(run):
        evals = [(r.round, recs[r.step]) for r in a.rows(recs)]
        if not (isinstance(a, OfflineArm) and a.config.rounds > 1 and evals):
            continue
        arm = a.name
        turns = len(evals[0][1]["succ_at_k"])
        lines = [f"| {arm}: round | training FLOPs (cumulative) | training wall s (cumulative) | "
                 + " | ".join(f"succ@{j}" for j in range(1, turns + 1)) + " | unique (≥2 turns) |",
                 "|---:|---:|---:|" + "---:|" * (turns + 1)]
        for k, e in evals:
            c = a.cost(recs, k)
            u = e.get("unique_ratio_multi_turn")
            lines.append(f"| {k} | {c.flops:.3g} | {c.wall_seconds:.0f} | "
                         + " | ".join(f"{100 * v:.1f}" for v in e["succ_at_k"])
                         + f" | {'–' if u is None else f'{u:.2f}'} |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n else "–"


def cost_table(run: Run, recs: Records) -> str:
    """The ledger of every stage, then each arm's training budget (rollout + weights + train)."""
    head = ("| stage | wall s | CPU s | generated tok | prefill tok | trained tok | aux fwd tok | steps | peak memory "
            "| FLOPs |")
    lines = [head, "|---|" + "---:|" * 9]

    def row(name: str, c: Cost) -> str:
        return (f"| {name} | {c.wall_seconds:.0f} | {c.cpu_seconds:.0f} | {c.generated_tokens:,} | {c.prefill_tokens:,} "
                f"| {c.trained_tokens:,} | {c.aux_forward_tokens:,} | {c.optimizer_steps} "
                f"| {_fmt_bytes(c.peak_memory_bytes)} | {c.flops:.3g} |")

    for name, rec in recs.items():
        if rec.get("cost"):
            lines.append(row(name, Cost.from_json(rec["cost"])))
    lines += ["", "Training budget of each arm (its share of the rollout counts in full; evaluation is not included):",
              "", head.replace("stage", "arm"), "|---|" + "---:|" * 9]
    lines += [row(a.label, a.cost(recs)) for a in _trained(run)]
    return "\n".join(lines) + "\n"


def weights_table(run: Run, recs: Records) -> str:
    lines = ["| arm | method | rows | degenerate groups | ESS mean | max weight | rows with \\|w\\| < 1e-3 |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for a in _trained(run):
        w = recs.get(str(StepId("weights", a.name))) if isinstance(a, OfflineArm) else None
        if w:
            lines.append(f"| {a.name} | {a.config.method} | {w['rows']} | {w['degenerate_groups']}/{w['groups']} | "
                         f"{w['ess_mean']:.2f} | {w['weight_max']:.3g} | {w['rows_weight_below_1e-3']} |")
    return "\n".join(lines) + "\n"


def _evals(recs: Records) -> dict[str, dict[str, Any]]:
    """The settings of each evaluation step, by step name."""
    return {name: r.get("settings", {}) for name, r in recs.items() if StepId.parse(name).stage == "eval"}


def environment_table(recs: Records) -> str:
    """The environment of the training rollout and of each evaluation; differences in bold."""
    # a key recorded only when changed (`option(result="changed")`) is at its default when absent
    defaults = {f.name: f.default for f in dataclasses.fields(EnvConfig) if f.metadata.get("result") == "changed"}
    roll = {**defaults, **(recs.get(str(StepId("rollout"))) or {}).get("settings", {})}
    evals = {name: {**defaults, **s} for name, s in _evals(recs).items()}
    lines = ["| key | rollout | " + " | ".join(evals) + " |", "|---|---|" + "---|" * len(evals)]
    for key in (*ENVIRONMENT_KEYS, "env_version"):
        cells = []
        for s in evals.values():
            v = repr(s.get(key))
            cells.append(f"**{v}**" if key in roll and s.get(key) != roll.get(key) else v)
        lines.append(f"| {key} | {roll.get(key)!r} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def settings_section(recs: Records) -> str:
    """Each artifact with the settings that made it (as stored beside it)."""
    out = []
    for name, rec in recs.items():
        s = rec.get("settings") or {}
        body = ", ".join(f"`{k}={v!r}`" for k, v in s.items())
        out.append(f"<details><summary>{name}: {rec.get('status')}, digest {rec.get('digest')}</summary>\n\n{body}\n"
                   "</details>\n")
    return "\n".join(out)


def curve_table(run: Run, recs: Records) -> str:
    """The learning curve of each online arm: held-out succ@k after every evaluated iteration."""
    parts = []
    for a in _trained(run):
        curve = a.curve(recs) if isinstance(a, OnlineArm) else []
        if not curve:
            continue
        arm = a.name
        turns = len(curve[0]["succ_at_k"])
        lines = [f"| {arm}: iteration | training FLOPs | training wall s | "
                 + " | ".join(f"succ@{k}" for k in range(1, turns + 1)) + " |", "|---:|---:|---:|" + "---:|" * turns]
        for point in curve:
            c = Cost.from_json(point["cost"])
            lines.append(f"| {point['iteration']} | {c.flops:.3g} | {c.wall_seconds:.0f} | "
                         + " | ".join(f"{100 * v:.1f}" for v in point["succ_at_k"]) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def plot_cost(run: Run, recs: Records, output_png: Path) -> bool:
    """Held-out succ@T against each arm's cumulative training FLOPs and wall seconds (cost.png):
    single-round offline arms as points, iterated arms over their rounds and online arms over
    their evaluated iterations as curves."""
    series = []
    for a in run.evaluated_arms():
        curve = a.curve(recs) if isinstance(a, OnlineArm) else []
        points = [(Cost.from_json(p["cost"]), 100 * p["succ_at_k"][-1]) for p in curve]
        if not points:
            points = [(a.cost(recs, r.round), 100 * recs[r.step]["succ_at_k"][-1]) for r in a.rows(recs)]
        if points:
            series.append((a.label, points))
    if not series:
        return False
    fig = Figure(figsize=(10, 4), dpi=120)
    for i, (xlabel, x) in enumerate((("training FLOPs", lambda c: c.flops), ("training wall seconds",
                                                                             lambda c: c.wall_seconds))):
        ax = fig.add_subplot(1, 2, i + 1)
        for label, points in series:
            ax.plot([x(c) for c, _ in points], [y for _, y in points], marker="o", label=label,
                    linestyle="-" if len(points) > 1 else "none")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out succ@T (%)")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output_png)
    return True


def _eval_trajectories(run: Run, arm: str) -> dict[str, Trajectory]:
    path = run.dir.eval(arm).rollout.shards
    if not path.is_dir():
        return {}
    return {t.prompt_id: t for t in read_trajectories(path) if t.sample_idx == 0}


def _conversation(t: Trajectory) -> str:
    out = []
    for m in t.messages:
        if m["role"] == "system":
            continue
        text = m["content"].strip().replace("\n", " ")
        out.append(f"**{m['role']}:** {text[:200]}")
    verdict = f"solved at turn {t.success_turn}" if t.success_turn else "not solved"
    return "<br>".join(out) + f"<br>*({verdict}; gold {t.gold})*"


def examples(run: Run, arm: str, k: int = EXAMPLES) -> list[tuple[Trajectory, Trajectory]]:
    """Held-out problems the base model failed and `arm` solved first, then any others."""
    base, after = _eval_trajectories(run, BASE), _eval_trajectories(run, arm)
    common = [p for p in sorted(base) if p in after]
    fixed = [p for p in common if base[p].success_turn is None and after[p].success_turn is not None]
    rest = [p for p in common if p not in fixed]
    return [(base[p], after[p]) for p in (fixed + rest)[:k]]


def examples_markdown(run: Run, arm: str) -> str:
    pairs = examples(run, arm)
    if not pairs:
        return ""
    lines = [f"| base | {arm} |", "|---|---|"]
    lines += [f"| {_conversation(b)} | {_conversation(a)} |" for b, a in pairs]
    return "\n".join(lines) + "\n"


def _setup(recs: Records) -> str:
    roll = (recs.get(str(StepId("rollout"))) or {}).get("settings", {})
    evals = list(_evals(recs).values())
    parts = [f"Rollouts: " + ", ".join(f"{k} `{roll[k]}`" for k in SETUP_KEYS if k in roll) + "."]
    if evals:
        parts.append("Evaluation: " + ", ".join(f"{k} `{evals[0][k]}`" for k in SETUP_KEYS if k in evals[0]) + ".")
    return " ".join(parts)


def _shown(run: Run) -> str:
    """The arm whose conversations the report shows: drift if there is one, else the first."""
    names = [a.name for a in _trained(run)]
    return "drift" if "drift" in names else names[0]


def write_report(run: Run, recs: Records) -> str:
    """Write report.md, succ_at_k.png and cost.png into the run directory from the records of the
    run's steps (by step name); return the markdown."""
    d = run.dir
    arms = [a for a in run.evaluated_arms() if str(StepId("eval", a.name)) in recs]
    metrics = [load_metrics(d.eval(a.name).path) for a in arms]
    labels = [a.label for a in arms]
    if metrics:
        plot_succ_at_k(metrics, labels, d.plot)
    has_cost_plot = plot_cost(run, recs, d.cost_plot)
    shown = _shown(run)
    md = [f"# {run.title}", "", _setup(recs), "",
          "## Multi-turn success on held-out problems", "",
          "succ@k: share of problems solved within k turns (± standard error over problems); unique: distinct "
          "answers / answers per conversation (≥2 turns: conversations that got feedback).", "",
          markdown_table(metrics, labels) if metrics else "(no evaluation finished yet)", "",
          "![succ@k](succ_at_k.png)", "",
          "## Correction", "",
          "Percent [95% interval]. The try-again loop stops at the first correct answer, so its correction rate "
          "is with oracle feedback; evaluations under the planted or no-oracle protocol (`drift eval --protocol`) "
          "get their own table.", "",
          correction_tables(metrics, labels) if metrics else "(no evaluation finished yet)", "",
          "## Environment", "",
          "The try-again environment of the training rollout and of each evaluation (a value that differs from "
          "the rollout's is in bold).", "", environment_table(recs), "",
          "## Weights", "", weights_table(run, recs), "",
          "## Cost", "",
          "FLOPs: 2N per forward token (prefill, generated, auxiliary) + 6N per trained token, N = parameters.",
          "", cost_table(run, recs), ""]
    if has_cost_plot:
        md += ["![succ@T against cost](cost.png)", ""]
    curves = curve_table(run, recs)
    if curves:
        md += ["## Learning curves of the online arms", "", curves]
    rounds = rounds_table(run, recs)
    if rounds:
        md += ["## Rounds of the iterated arms", "",
               "Round k samples the training prompts afresh from round k-1's model, weights them against it and "
               "trains; its cost includes every round before it.", "", rounds]
    ex = examples_markdown(run, shown)
    if ex:
        md += [f"## Held-out conversations before and after training ({shown})", "", ex]
    md += ["## Settings of each artifact", "", settings_section(recs)]
    text = "\n".join(md)
    d.report.write_text(text)
    return text


def print_console_summary(run: Run, recs: Records) -> None:
    """The demo's closing screen: every evaluation with its training cost, and before/after conversations."""
    console = Console()
    arms = {a.name: a for a in run.evaluated_arms()}
    rows = result_rows(run, recs)
    if not rows:
        return
    t_max = max(len(recs[r.step]["succ_at_k"]) for r in rows)
    table = Table(title="held-out multi-turn success (greedy, with feedback); arm@k: after round k",
                  caption="training cost: the rollouts and training that made the model (evaluation excluded)")
    for col in ["arm"] + [f"succ@{k}" for k in range(1, t_max + 1)] + ["unique (≥2 turns)", "training FLOPs",
                                                                         "training time"]:
        table.add_column(col, justify="left" if col == "arm" else "right")
    for r in rows:
        name, m, cost = r.label, recs[r.step], arms[r.arm].cost(recs, r.round)
        u = m.get("unique_ratio_multi_turn")
        table.add_row(name, *[f"{100 * v:.0f}%" for v in m["succ_at_k"]], "–" if u is None else f"{u:.2f}",
                      f"{cost.flops:.2g}" if cost.flops else "–",
                      f"{cost.wall_seconds / 60:.1f} min" if cost.wall_seconds else "–")
    console.print(table)
    shown = _shown(run)
    for before, after in examples(run, shown):
        pair = Table(title=f"problem {before.prompt_id} (gold {before.gold})", show_lines=True)
        pair.add_column("base")
        pair.add_column(shown)
        pair.add_row(_plain(before), _plain(after))
        console.print(pair)
    console.print(f"report: {run.dir.report}")


def _plain(t: Trajectory) -> str:
    lines = [f"{m['role']}: {m['content'].strip()[:160]}" for m in t.messages if m["role"] != "system"]
    return "\n".join(lines[1:]) + f"\n-> {'solved at turn ' + str(t.success_turn) if t.success_turn else 'not solved'}"
