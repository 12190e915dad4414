"""report.md, succ_at_k.png and cost.png for a pipeline run, and the demo's console summary.

Everything comes from the records the stages wrote (`drift.rundir`), read through `RunDir`:
the settings shown are each artifact's own, not the config of the latest command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from drift.evaluate import load_metrics, markdown_table, plot_succ_at_k
from drift.ledger import Cost
from drift.records import Trajectory, read_trajectories
from drift.rundir import RunDir, read_record

EXAMPLES = 3
SETUP_KEYS = ("model", "tasks", "split", "num_problems", "n", "max_turns", "temperature", "top_p", "max_new_tokens",
              "dtype", "seed")
ENV_KEYS = ("env", "env_args", "env_version", "system_prompt", "instruction", "feedback", "checker", "check_timeout",
            "max_turns")


def _arms(cfg: Any) -> list[str]:
    return (["base"] if cfg.eval_base else []) + list(cfg.arms)


def _label(cfg: Any, arm: str) -> str:
    return arm if arm == "base" else f"{arm} ({cfg.arms[arm].method})"


def records(steps: list[tuple[str, Path]]) -> dict[str, dict[str, Any]]:
    """The records on disk of a run's steps, by step name ("rollout", "weights/drift",
    "train/drift/round-2", "eval/base", ...)."""
    found = {name: read_record(path) for name, path in steps}
    return {name: r for name, r in found.items() if r is not None}


def _round_of(name: str, arm: str) -> int | None:
    """The round of `arm` a step belongs to (the shared rollout: round 1), or None if it is not the arm's."""
    parts = name.split("/")
    if parts == ["rollout"]:
        return 1
    if len(parts) < 2 or parts[1] != arm:
        return None
    return int(parts[2].removeprefix("round-")) if len(parts) > 2 and parts[2].startswith("round-") else 1


def arm_cost(recs: dict[str, dict[str, Any]], arm: str, upto: int | None = None) -> Cost:
    """What an arm's model cost to make (not its evaluations): an offline arm's share of the rollout
    counts in full, with its weights and training, and for an iterated arm every round up to
    `upto` (default: all); an online arm's rollouts and updates."""
    total = Cost()
    if arm == "base":
        return total
    online = f"online/{arm}" in recs
    for name, rec in recs.items():
        k = _round_of(name, arm)
        if name == "rollout" and online:  # the online arm samples its own conversations
            continue
        if k is not None and not name.startswith("eval/") and (upto is None or k <= upto):
            total = total + Cost.from_json(rec.get("cost"))
    return total


def result_rows(cfg: Any, recs: dict[str, dict[str, Any]]) -> list[tuple[str, str, str, int]]:
    """Every finished held-out evaluation of a run, in order: (row, arm, eval step, round). An
    iterated arm gives one row per round (`drift@1`, `drift@2`, ...; its last round is the arm's
    own evaluation), every other arm and the base one row."""
    rows = []
    for arm in _arms(cfg):
        rounds = cfg.arms[arm].rounds if arm != "base" and cfg.arms[arm].offline else 1
        for k in range(1, rounds + 1):
            step = f"eval/{arm}" if k == rounds else f"eval/{arm}/round-{k}"
            if step in recs:
                rows.append((arm if rounds == 1 else f"{arm}@{k}", arm, step, k))
    return rows


def rounds_table(cfg: Any, recs: dict[str, dict[str, Any]]) -> str:
    """Each iterated arm's held-out succ@k after every round, with the cumulative cost of the rounds."""
    rows = result_rows(cfg, recs)
    parts = []
    for arm, a in cfg.arms.items():
        evals = [(k, recs[step]) for _, r_arm, step, k in rows if r_arm == arm]
        if not (a.offline and a.rounds > 1 and evals):
            continue
        turns = len(evals[0][1]["succ_at_k"])
        lines = [f"| {arm}: round | training FLOPs (cumulative) | training wall s (cumulative) | "
                 + " | ".join(f"succ@{j}" for j in range(1, turns + 1)) + " | unique (≥2 turns) |",
                 "|---:|---:|---:|" + "---:|" * (turns + 1)]
        for k, e in evals:
            c = arm_cost(recs, arm, k)
            u = e.get("unique_ratio_multi_turn")
            lines.append(f"| {k} | {c.flops:.3g} | {c.wall_seconds:.0f} | "
                         + " | ".join(f"{100 * v:.1f}" for v in e["succ_at_k"])
                         + f" | {'–' if u is None else f'{u:.2f}'} |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n else "–"


def cost_table(cfg: Any, recs: dict[str, dict[str, Any]]) -> str:
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
    lines += [row(_label(cfg, arm), arm_cost(recs, arm)) for arm in cfg.arms]
    return "\n".join(lines) + "\n"


def weights_table(cfg: Any, recs: dict[str, dict[str, Any]]) -> str:
    lines = ["| arm | method | rows | degenerate groups | ESS mean | max weight | rows with \\|w\\| < 1e-3 |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for arm, a in cfg.arms.items():
        w = recs.get(f"weights/{arm}") if a.offline else None
        if w:
            lines.append(f"| {arm} | {a.method} | {w['rows']} | {w['degenerate_groups']}/{w['groups']} | "
                         f"{w['ess_mean']:.2f} | {w['weight_max']:.3g} | {w['rows_weight_below_1e-3']} |")
    return "\n".join(lines) + "\n"


def environment_table(recs: dict[str, dict[str, Any]]) -> str:
    """The environment of the training rollout and of each evaluation; differences in bold."""
    roll = (recs.get("rollout") or {}).get("settings", {})
    evals = {name: r.get("settings", {}) for name, r in recs.items() if name.startswith("eval/")}
    lines = ["| key | rollout | " + " | ".join(evals) + " |", "|---|---|" + "---|" * len(evals)]
    for key in ENV_KEYS:
        cells = []
        for s in evals.values():
            v = repr(s.get(key))
            cells.append(f"**{v}**" if key in roll and s.get(key) != roll.get(key) else v)
        lines.append(f"| {key} | {roll.get(key)!r} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def settings_section(recs: dict[str, dict[str, Any]]) -> str:
    """Each artifact with the settings that made it (as stored beside it)."""
    out = []
    for name, rec in recs.items():
        s = rec.get("settings") or {}
        body = ", ".join(f"`{k}={v!r}`" for k, v in s.items())
        out.append(f"<details><summary>{name}: {rec.get('status')}, digest {rec.get('digest')}</summary>\n\n{body}\n"
                   "</details>\n")
    return "\n".join(out)


def curve_table(cfg: Any, recs: dict[str, dict[str, Any]]) -> str:
    """The learning curve of each online arm: held-out succ@k after every evaluated iteration."""
    parts = []
    for arm, a in cfg.arms.items():
        curve = (recs.get(f"online/{arm}") or {}).get("curve") or []
        if a.offline or not curve:
            continue
        turns = len(curve[0]["succ_at_k"])
        lines = [f"| {arm}: iteration | training FLOPs | training wall s | "
                 + " | ".join(f"succ@{k}" for k in range(1, turns + 1)) + " |", "|---:|---:|---:|" + "---:|" * turns]
        for point in curve:
            c = Cost.from_json(point["cost"])
            lines.append(f"| {point['iteration']} | {c.flops:.3g} | {c.wall_seconds:.0f} | "
                         + " | ".join(f"{100 * v:.1f}" for v in point["succ_at_k"]) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def plot_cost(cfg: Any, recs: dict[str, dict[str, Any]], output_png: Path) -> bool:
    """Held-out succ@T against each arm's cumulative training FLOPs and wall seconds (cost.png):
    single-round offline arms as points, iterated arms over their rounds and online arms over
    their evaluated iterations as curves."""
    from matplotlib.figure import Figure

    series = []
    rows = result_rows(cfg, recs)
    for arm in _arms(cfg):
        curve = (recs.get(f"online/{arm}") or {}).get("curve") or []
        points = [(Cost.from_json(p["cost"]), 100 * p["succ_at_k"][-1]) for p in curve]
        if not points:
            points = [(arm_cost(recs, arm, k), 100 * recs[step]["succ_at_k"][-1])
                      for _, a, step, k in rows if a == arm]
        if points:
            series.append((_label(cfg, arm), points))
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


def _eval_trajectories(cfg: Any, arm: str) -> dict[str, Trajectory]:
    path = cfg.dir.eval(arm).rollout.shards
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


def examples(cfg: Any, arm: str, k: int = EXAMPLES) -> list[tuple[Trajectory, Trajectory]]:
    """Held-out problems the base model failed and `arm` solved first, then any others."""
    base, after = _eval_trajectories(cfg, "base"), _eval_trajectories(cfg, arm)
    common = [p for p in sorted(base) if p in after]
    fixed = [p for p in common if base[p].success_turn is None and after[p].success_turn is not None]
    rest = [p for p in common if p not in fixed]
    return [(base[p], after[p]) for p in (fixed + rest)[:k]]


def examples_markdown(cfg: Any, arm: str) -> str:
    pairs = examples(cfg, arm)
    if not pairs:
        return ""
    lines = [f"| base | {arm} |", "|---|---|"]
    lines += [f"| {_conversation(b)} | {_conversation(a)} |" for b, a in pairs]
    return "\n".join(lines) + "\n"


def _setup(recs: dict[str, dict[str, Any]]) -> str:
    roll = (recs.get("rollout") or {}).get("settings", {})
    evals = [r.get("settings", {}) for n, r in recs.items() if n.startswith("eval/")]
    parts = [f"Rollouts: " + ", ".join(f"{k} `{roll[k]}`" for k in SETUP_KEYS if k in roll) + "."]
    if evals:
        parts.append("Evaluation: " + ", ".join(f"{k} `{evals[0][k]}`" for k in SETUP_KEYS if k in evals[0]) + ".")
    return " ".join(parts)


def write_report(cfg: Any, steps: list[tuple[str, Path]]) -> str:
    """Write report.md, succ_at_k.png and cost.png into the run directory from the records of the
    run's steps (name, record path); return the markdown."""
    d: RunDir = cfg.dir
    recs = records(steps)
    arms = [a for a in _arms(cfg) if f"eval/{a}" in recs]
    metrics = [load_metrics(d.eval(a).path) for a in arms]
    labels = [_label(cfg, a) for a in arms]
    if metrics:
        plot_succ_at_k(metrics, labels, d.plot)
    has_cost_plot = plot_cost(cfg, recs, d.cost_plot)
    shown = next((a for a in cfg.arms if a == "drift"), next(iter(cfg.arms)))
    md = [f"# {cfg.title}", "", _setup(recs), "",
          "## Multi-turn success on held-out problems", "",
          "succ@k: share of problems solved within k turns (± standard error over problems); unique: distinct "
          "answers / answers per conversation (≥2 turns: conversations that got feedback).", "",
          markdown_table(metrics, labels) if metrics else "(no evaluation finished yet)", "",
          "![succ@k](succ_at_k.png)", "",
          "## Environment", "",
          "The try-again environment of the training rollout and of each evaluation (a value that differs from "
          "the rollout's is in bold).", "", environment_table(recs), "",
          "## Weights", "", weights_table(cfg, recs), "",
          "## Cost", "",
          "FLOPs: 2N per forward token (prefill, generated, auxiliary) + 6N per trained token, N = parameters.",
          "", cost_table(cfg, recs), ""]
    if has_cost_plot:
        md += ["![succ@T against cost](cost.png)", ""]
    curves = curve_table(cfg, recs)
    if curves:
        md += ["## Learning curves of the online arms", "", curves]
    rounds = rounds_table(cfg, recs)
    if rounds:
        md += ["## Rounds of the iterated arms", "",
               "Round k samples the training prompts afresh from round k-1's model, weights them against it and "
               "trains; its cost includes every round before it.", "", rounds]
    ex = examples_markdown(cfg, shown)
    if ex:
        md += [f"## Held-out conversations before and after training ({shown})", "", ex]
    md += ["## Settings of each artifact", "", settings_section(recs)]
    text = "\n".join(md)
    d.report.write_text(text)
    return text


def print_console_summary(cfg: Any, recs: dict[str, dict[str, Any]]) -> None:
    """The demo's closing screen: every evaluation with its training cost, and before/after conversations."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    rows = result_rows(cfg, recs)
    if not rows:
        return
    t_max = max(len(recs[step]["succ_at_k"]) for _, _, step, _ in rows)
    table = Table(title="held-out multi-turn success (greedy, with feedback); arm@k: after round k",
                  caption="training cost: the rollouts and training that made the model (evaluation excluded)")
    for col in ["arm"] + [f"succ@{k}" for k in range(1, t_max + 1)] + ["unique (≥2 turns)", "training FLOPs",
                                                                         "training time"]:
        table.add_column(col, justify="left" if col == "arm" else "right")
    for name, arm, step, k in rows:
        m, cost = recs[step], arm_cost(recs, arm, k)
        u = m.get("unique_ratio_multi_turn")
        table.add_row(name, *[f"{100 * v:.0f}%" for v in m["succ_at_k"]], "–" if u is None else f"{u:.2f}",
                      f"{cost.flops:.2g}" if cost.flops else "–",
                      f"{cost.wall_seconds / 60:.1f} min" if cost.wall_seconds else "–")
    console.print(table)
    shown = next((a for a in cfg.arms if a == "drift"), next(iter(cfg.arms)))
    for before, after in examples(cfg, shown):
        pair = Table(title=f"problem {before.prompt_id} (gold {before.gold})", show_lines=True)
        pair.add_column("base")
        pair.add_column(shown)
        pair.add_row(_plain(before), _plain(after))
        console.print(pair)
    console.print(f"report: {cfg.dir.report}")


def _plain(t: Trajectory) -> str:
    lines = [f"{m['role']}: {m['content'].strip()[:160]}" for m in t.messages if m["role"] != "system"]
    return "\n".join(lines[1:]) + f"\n-> {'solved at turn ' + str(t.success_turn) if t.success_turn else 'not solved'}"
