"""report.md and succ_at_k.png for a pipeline run, and the demo's console summary.

Reads only the files the stages wrote (manifest.json, <arm>.weights.json,
train_summary.json, metrics.json, eval trajectories).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from drift.evaluate import load_metrics, markdown_table, plot_succ_at_k
from drift.records import Trajectory, read_trajectories

EXAMPLES = 3


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _arms(cfg: Any) -> list[str]:
    return (["base"] if cfg.eval_base else []) + list(cfg.arms)


def cost_table(cfg: Any) -> str:
    """Tokens generated, tokens trained and wall time of every stage."""
    d = cfg.dir
    roll = _json(d / "rollout" / "manifest.json")
    rt = roll.get("timings", {})
    gen = sum(s.get("generated_tokens", 0) for s in rt.get("sessions", []))
    lines = ["| stage | arm | rows | tokens generated | tokens trained | wall time (s) |",
             "|---|---|---:|---:|---:|---:|",
             f"| rollout | all | {roll.get('counts', {}).get('written', '–')} | {gen:,} | – | {rt.get('wall_seconds', 0):.0f} |"]
    for arm in cfg.arms:
        w = _json(d / "weights" / f"{arm}.weights.json")
        t = _json(d / "train" / arm / "train_summary.json")
        rows = t.get("data", {}).get("rows_used", w.get("rows", "–"))
        lines.append(f"| train | {arm} ({cfg.arms[arm].method}) | {rows} | – | "
                     f"{t.get('trained_tokens', 0):,} | {t.get('seconds', 0):.0f} |")
    for arm in _arms(cfg):
        m = _json(d / "eval" / arm / "metrics.json")
        lines.append(f"| eval | {arm} | {m.get('num_trajectories', '–')} | {m.get('total_tokens', 0):,} | – | "
                     f"{m.get('wall_time_s') or 0:.0f} |")
    return "\n".join(lines) + "\n"


def weights_table(cfg: Any) -> str:
    lines = ["| arm | method | rows | degenerate groups | ESS mean | max weight | rows with \\|w\\| < 1e-3 |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for arm, a in cfg.arms.items():
        w = _json(cfg.dir / "weights" / f"{arm}.weights.json")
        if w:
            lines.append(f"| {arm} | {a.method} | {w['rows']} | {w['degenerate_groups']}/{w['groups']} | "
                         f"{w['ess_mean']:.2f} | {w['weight_max']:.3g} | {w['rows_weight_below_1e-3']} |")
    return "\n".join(lines) + "\n"


def _eval_trajectories(cfg: Any, arm: str) -> dict[str, Trajectory]:
    path = cfg.dir / "eval" / arm / "rollout" / "trajectories"
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


def write_report(cfg: Any) -> str:
    """Write report.md and succ_at_k.png into the run directory; return the markdown."""
    arms = [a for a in _arms(cfg) if (cfg.dir / "eval" / a / "metrics.json").is_file()]
    metrics = [load_metrics(cfg.dir / "eval" / a) for a in arms]
    labels = [a if a == "base" else f"{a} ({cfg.arms[a].method})" for a in arms]
    plot_succ_at_k(metrics, labels, cfg.dir / "succ_at_k.png")
    roll = cfg.rollout_config()
    ev = cfg.eval_config("base")
    shown = next((a for a in cfg.arms if a == "drift"), next(iter(cfg.arms)))
    md = [f"# {cfg.title}", "",
          f"Reference model `{cfg.model}`. Rollouts: {roll.num_problems or 'all'} `{roll.tasks}` problems "
          f"(split {roll.split}) x {roll.n} samples, up to {roll.max_turns} turns, temperature {roll.temperature}. "
          f"Evaluation: {ev.num_problems or 'all'} held-out `{ev.tasks}` problems (split {ev.split}), "
          f"temperature {ev.temperature}, up to {ev.max_turns} turns with the feedback "
          f"\"{roll.feedback}\".", "",
          "## Multi-turn success on held-out problems", "",
          "succ@k: share of problems solved within k turns (± standard error over problems); unique: distinct "
          "answers / answers per conversation (≥2 turns: conversations that got feedback).", "",
          markdown_table(metrics, labels), "", "![succ@k](succ_at_k.png)", "",
          "## Weights", "", weights_table(cfg), "",
          "## Cost", "", cost_table(cfg), ""]
    ex = examples_markdown(cfg, shown)
    if ex:
        md += [f"## Held-out conversations before and after training ({shown})", "", ex]
    text = "\n".join(md)
    (cfg.dir / "report.md").write_text(text)
    return text


def print_console_summary(cfg: Any) -> None:
    """The demo's closing screen: the arm table and before/after conversations."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    arms = [a for a in _arms(cfg) if (cfg.dir / "eval" / a / "metrics.json").is_file()]
    metrics = [load_metrics(cfg.dir / "eval" / a) for a in arms]
    if not metrics:
        return
    t_max = max(m["max_turns"] for m in metrics)
    table = Table(title="held-out multi-turn success (greedy, with feedback)")
    for col in ["arm"] + [f"succ@{k}" for k in range(1, t_max + 1)] + ["unique", "mean turns"]:
        table.add_column(col, justify="left" if col == "arm" else "right")
    for arm, m in zip(arms, metrics):
        table.add_row(arm, *[f"{100 * v:.0f}%" for v in m["succ_at_k"]],
                      f"{m['unique_ratio']:.2f}" if m["unique_ratio"] is not None else "–", f"{m['mean_turns']:.2f}")
    console.print(table)
    shown = next((a for a in cfg.arms if a == "drift"), next(iter(cfg.arms)))
    for before, after in examples(cfg, shown):
        pair = Table(title=f"problem {before.prompt_id} (gold {before.gold})", show_lines=True)
        pair.add_column("base")
        pair.add_column(shown)
        pair.add_row(_plain(before), _plain(after))
        console.print(pair)
    console.print(f"report: {cfg.dir / 'report.md'}")


def _plain(t: Trajectory) -> str:
    lines = [f"{m['role']}: {m['content'].strip()[:160]}" for m in t.messages if m["role"] != "system"]
    return "\n".join(lines[1:]) + f"\n-> {'solved at turn ' + str(t.success_turn) if t.success_turn else 'not solved'}"
