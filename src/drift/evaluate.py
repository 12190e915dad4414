"""`drift eval` and `drift compare`: multi-turn evaluation runs and their side-by-side comparison.

An eval run is a rollout of held-out problems (greedy by default, same try-again environment)
scored by `drift.metrics.compute_metrics`. Its directory holds:
    rollout/     the eval trajectories (a rollout run directory; resumable)
    metrics.json every metric, plus per-problem succ@k for paired comparisons
    metrics.md   the same as markdown tables
An existing trajectory file or directory can be scored instead of a model.

`protocol` chooses what is measured (`drift.metrics`): `oracle`, the try-again loop that stops
at the first correct answer (its correction numbers are with oracle feedback); `no-oracle`,
SCoRe's second attempt after "Please check your answer and answer again." whatever the first
answer was; `planted`, every problem's turn 1 a given wrong answer (`drift.planted`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from drift import DriftError
from drift.config import option, to_dict
from drift.env import DEFAULT_FEEDBACK, ENVIRONMENT_KEYS, NO_ORACLE_FEEDBACK
from drift.eval_tables import correction_tables, plot_correction
from drift.metrics import PROTOCOLS, compute_metrics
from drift.planted import choose_planted, plant, read_planted
from drift.records import Trajectory, read_trajectories, require_complete, trajectory_files, write_json, write_jsonl
from drift.rollout.config import RolloutConfig, sampling_record, task_spec
from drift.rollout.engine import run_rollout
from drift.rollout.protocol import Backend
from drift.rundir import CORRECTION_PLOT_FILE, PLOT_FILE, EvalDir, config_record, ensure_writable, read_record, trained_record
from drift.stats import enumeration_baseline
from drift.tasks import Problem, TaskSpec, load_tasks
from drift.tasks.generators import GENERATORS

log = logging.getLogger(__name__)


@dataclass
class EvalConfig(RolloutConfig):
    """A rollout config with eval defaults (held-out split, one greedy sample) plus `trajectories`.

    Every task, environment, sampling and backend field of `RolloutConfig` applies to the eval
    rollout, which is written to `<output>/rollout` by the rollout engine itself.
    """

    model: str | None = option(None, "model to evaluate (directory, hub name or alias); give this or --trajectories")
    trajectories: str | None = option(None, "score an existing trajectory file, shard directory or rollout directory "
                                      "instead of generating (give this or --model)", result=False)
    allow_incomplete: bool = option(False, "with --trajectories: score a rollout whose manifest says it did not finish "
                                    "(what is there so far)", result=False)
    output: str = option("", "eval directory: metrics.json, metrics.md and the eval rollout in rollout/ (required)", result=False)
    split: str = option("test", "train, test or all: a fixed half of the problems by a hash of their identity "
                        "(generators: the fact; files and hub datasets: the id)")
    n: int = option(1, "samples per problem; > 1 also reports pass@k from the turn-1 samples (needs temperature > 0)")
    temperature: float = option(0.0, "sampling temperature (0: greedy, the eval default)")
    protocol: Literal["oracle", "no-oracle", "planted"] = option(
        "oracle", "oracle: the try-again loop, stopped at the first correct answer; no-oracle: a second attempt "
        "after every answer (SCoRe; the default feedback becomes \"" + NO_ORACLE_FEEDBACK + "\"); planted: "
        "turn 1 is a given wrong answer (--planted) and the model answers from turn 2", result="changed")
    planted: str | None = option(None, "planted protocol: a planted.jsonl (rows prompt_id, response), an eval "
                                 "directory holding one, or trajectories whose wrong turn-1 answers to plant; none: "
                                 "sample --plant-model and store them in <output>/planted.jsonl", result=False)
    plant_model: str = option("smollm2-135m", "planted protocol without --planted: the reference model whose wrong "
                              "turn-1 answers are planted", result=False)
    plant_samples: int = option(8, "planted protocol without --planted: turn-1 samples per problem (temperature 1) "
                                "to find a wrong answer among", result=False)

    def __post_init__(self) -> None:
        if self.protocol == "no-oracle":
            self.oracle = False
            if self.feedback == DEFAULT_FEEDBACK:  # "Incorrect" after a right answer would be a lie
                self.feedback = NO_ORACLE_FEEDBACK
        super().__post_init__()
        if self.protocol not in PROTOCOLS:
            raise DriftError(f"unknown protocol {self.protocol!r}: choose one of {', '.join(PROTOCOLS)}")
        if self.protocol != "no-oracle" and not self.oracle:
            raise DriftError("oracle = false is the no-oracle protocol: pass --protocol no-oracle")
        if self.protocol == "planted" and self.max_turns < 2:
            raise DriftError("the planted protocol needs max_turns >= 2 (turn 1 is the planted answer)")
        if self.plant_samples < 1:
            raise DriftError(f"plant_samples must be >= 1, got {self.plant_samples}")
        if (self.model is None) == (self.trajectories is None):
            raise DriftError("eval needs exactly one of --model (generate and score) and --trajectories "
                             "(score existing trajectories)")
        if not self.output:
            raise DriftError("eval needs an output directory (--output)")
        if self.model is not None and self.n > 1 and self.temperature == 0:
            raise DriftError(f"n = {self.n} greedy samples would all be the same: set temperature > 0 for pass@k")


INHERITED_KEYS = (*ENVIRONMENT_KEYS, "check_workers")  # the environment and how its checker runs


def inherit_environment(source: dict[str, Any], eval_keys: dict[str, Any]) -> dict[str, Any]:
    """`eval_keys`, plus the environment keys they do not set, taken from `source` (a rollout's keys):
    held-out evaluation runs in the training rollout's environment unless told otherwise."""
    return {**{k: v for k, v in source.items() if k in INHERITED_KEYS and k not in eval_keys}, **eval_keys}


def rollout_config(cfg: EvalConfig) -> RolloutConfig:
    """The rollout of an eval: every shared field as it is, written to <output>/rollout."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(RolloutConfig)}
    return RolloutConfig(**{**values, "output": str(EvalDir(Path(cfg.output)).rollout.path), "planted": None})


def existing_trajectories(cfg: EvalConfig) -> tuple[list[Trajectory], dict[str, Any] | None]:
    """The trajectories and rollout manifest of --trajectories; an unfinished rollout only with --allow-incomplete."""
    _, manifest = trajectory_files(cfg.trajectories)
    if not cfg.allow_incomplete:
        require_complete(cfg.trajectories, manifest, hint=", or pass --allow-incomplete to score what is there")
    elif manifest is not None and manifest.get("status") != "complete":
        log.warning("%s: the rollout is not complete (status %r); scoring what is there",
                    cfg.trajectories, manifest.get("status"))
    return read_trajectories(cfg.trajectories), manifest


def run_eval(cfg: EvalConfig, problems: list[Problem] | None = None, backend: Backend | None = None) -> dict[str, Any]:
    """Evaluate a model (or score existing trajectories); write metrics.json and metrics.md; return the metrics.

    1. Trajectories: roll out `cfg.model` on the tasks into <output>/rollout (resumable), or read
       `cfg.trajectories`.
    2. Score them with turn limit `cfg.max_turns` (`drift.metrics.compute_metrics`).
    3. Add what only the rollout knows (wall time, skipped conversations) and the eval config.
    4. Write metrics.json and metrics.md (the CLI prints the summary table: `markdown_table`).
    """
    out = EvalDir(ensure_writable(cfg.output))
    # step 1
    planted: dict[str, Any] | None = None
    if cfg.model is not None:
        rcfg = rollout_config(cfg)
        problems = load_tasks(task_spec(rcfg)) if problems is None else problems
        options = option_count(problems)
        if cfg.protocol == "planted":
            problems, planted = planted_problems(cfg, problems, backend)
        rec = stage_record(cfg, problems, trained_record(cfg.model))
        manifest = run_rollout(rcfg, problems=problems, backend=backend)
        trajs = read_trajectories(out.rollout.shards)
        source = {"model": cfg.model, "rollout": str(out.rollout.path)}
        protocol = cfg.protocol
    else:
        trajs, manifest = existing_trajectories(cfg)
        rec = config_record("eval", cfg, manifest, cfg.trajectories)
        source = {"trajectories": str(cfg.trajectories), "model": (manifest or {}).get("model")}
        protocol = made_under(trajs, manifest)
        options = option_count(manifest_problems(manifest))
    # step 2
    metrics = compute_metrics(trajs, cfg.max_turns, protocol)
    if metrics.get("planted") and planted:
        metrics["planted"].update(planted)
    if options:
        metrics["enumeration_baseline"] = [enumeration_baseline(k, options) for k in range(1, cfg.max_turns + 1)]
    if metrics["ended_early"]:
        log.warning("%d unsolved conversation(s) ended before turn %d: were they rolled out with fewer turns? "
                    "(score with --max-turns to match)", metrics["ended_early"], cfg.max_turns)
    # step 3
    manifest = manifest or {}
    skipped = len(manifest.get("skipped") or [])
    if skipped:
        log.warning("%d conversation(s) were skipped by the rollout (prompt longer than the model context) "
                    "and are not scored", skipped)
    metrics.update(
        wall_time_s=manifest.get("timings", {}).get("wall_seconds"),
        skipped_conversations=skipped,
        source=source,
        config=to_dict(cfg),
        **{**rec, "status": "complete"}, cost=manifest.get("cost") if cfg.model is not None else None,
    )
    # step 4
    write_json(out.metrics, metrics)
    out.table.write_text(metrics_markdown(metrics, run_label(out.path)))
    log.info("wrote %s and %s", out.metrics, out.table)
    return metrics


def planted_problems(cfg: EvalConfig, problems: list[Problem], backend: Backend | None
                     ) -> tuple[list[Problem], dict[str, Any]]:
    """The problems carrying their planted answers (`drift.planted`), and where the answers came from.

    From `cfg.planted`; else from this eval's own planted.jsonl (a resumed eval); else sampled from
    `cfg.plant_model` (`plant_samples` turn-1 samples at temperature 1 into <output>/plant-rollout)
    and written to <output>/planted.jsonl. `backend` serves that rollout when the plant model is the
    model under evaluation."""
    out = EvalDir(Path(cfg.output))
    if cfg.planted is not None:
        answers, origin = read_planted(cfg.planted), str(cfg.planted)
    elif out.planted.is_file():
        answers, origin = read_planted(out.planted), str(out.planted)
    else:
        values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(RolloutConfig)}
        pcfg = RolloutConfig(**{**values, "model": cfg.plant_model, "n": cfg.plant_samples, "temperature": 1.0,
                                "max_turns": 1, "output": str(out.plant_rollout.path),
                                "planted": None})
        run_rollout(pcfg, problems=problems, backend=backend if cfg.plant_model == cfg.model else None)
        rows = choose_planted(read_trajectories(out.plant_rollout.shards))
        write_jsonl(out.planted, rows)
        answers, origin = {r["prompt_id"]: r["response"] for r in rows}, f"{cfg.plant_model} (sampled)"
    planted, missing = plant(problems, answers)
    return planted, {"source": origin, "without_answer": missing}


def made_under(trajs: list[Trajectory], manifest: dict[str, Any] | None) -> str:
    """The protocol existing trajectories were made under: planted turns, or an environment without oracle."""
    if any(t.metadata.get("planted") for t in trajs):
        return "planted"
    return "no-oracle" if ((manifest or {}).get("env") or {}).get("oracle") is False else "oracle"


def option_count(problems: list[Problem]) -> int | None:
    """The number of options when every problem is multiple choice with the same number (else None)."""
    counts = {len(p.metadata["options"]) if p.checker == "choice" and "options" in p.metadata else None
              for p in problems}
    return counts.pop() if len(counts) == 1 else None


def manifest_problems(manifest: dict[str, Any] | None) -> list[Problem]:
    """The problems of a rollout made from a built-in generator (others are not reloaded to score)."""
    task = (manifest or {}).get("task")
    if not task or task.get("tasks") not in GENERATORS:
        return []
    return load_tasks(TaskSpec(**{f.name: task[f.name] for f in dataclasses.fields(TaskSpec) if f.name in task}))


def stage_record(cfg: EvalConfig, problems: list[Problem], model_record: dict[str, Any] | None) -> dict[str, Any]:
    """The eval's stage record (`drift.rundir`): its settings, the held-out problems, the model's origin."""
    return sampling_record("eval", cfg, problems, model_record)


def run_label(eval_dir: str | Path) -> str:
    """An eval run's name in tables: its directory's name."""
    return Path(eval_dir).resolve().name


def _pct(x: float | None, se: float | None = None) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f}" if se is None else f"{100 * x:.1f} ± {100 * se:.1f}"


def _num(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def markdown_table(metrics_list: Sequence[dict[str, Any]], labels: Sequence[str]) -> str:
    """One row per run: succ@k ± se (percent) for k = 1..T, then repetition, turns, format, length."""
    if len(metrics_list) != len(labels):
        raise DriftError(f"{len(labels)} labels for {len(metrics_list)} runs")
    t_max = max(m["max_turns"] for m in metrics_list)
    head = (["run", "problems"] + [f"succ@{k}" for k in range(1, t_max + 1)]
            + ["unique", "unique (≥2 turns)", "turns to success", "unparseable", "tokens/turn"])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for label, m in zip(labels, metrics_list):
        succ = [_pct(m["succ_at_k"][k], m["succ_at_k_se"][k]) if k < m["max_turns"] else "–" for k in range(t_max)]
        row = ([label, str(m["num_problems"])] + succ
               + [_num(m["unique_ratio"], 3), _num(m["unique_ratio_multi_turn"], 3),
                  _num(m["mean_turns_to_success"]), _pct(m["unparseable_rate"]), _num(m["response_tokens"], 1)])
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def per_turn_table(m: dict[str, Any]) -> str:
    """One row per turn: attempted, correct, conditional accuracy, correction rate, succ@k."""
    head = ["turn", "attempted", "correct", "cond. acc.", "correction rate (base)", "unparseable", "succ@k"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---:"] * len(head)) + "|"]
    for k in range(m["max_turns"]):
        corr = "–" if k == 0 else f"{_pct(m['correction_rate'][k])} ({m['correction_base'][k]})"
        row = [str(k + 1), str(m["attempted"][k]), str(m["correct"][k]), _pct(m["cond_acc"][k]), corr,
               _pct(m["unparseable_rate_by_turn"][k]), _pct(m["succ_at_k"][k], m["succ_at_k_se"][k])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def pass_at_k_table(m: dict[str, Any]) -> str:
    if not m.get("pass_at_k"):
        return ""
    ks = list(m["pass_at_k"])
    lines = ["| " + " | ".join(f"pass@{k}" for k in ks) + " |", "|" + "|".join(["---:"] * len(ks)) + "|",
             "| " + " | ".join(_pct(m["pass_at_k"][k], m["pass_at_k_se"][k]) for k in ks) + " |"]
    return "\n".join(lines) + "\n"


def metrics_markdown(m: dict[str, Any], label: str) -> str:
    """The metrics.md of one eval run."""
    parts = [f"# eval: {label}\n", markdown_table([m], [label]),
             "succ@k in percent ± standard error over problems. unique: distinct answers / parsed answers "
             "per conversation (≥2 turns: multi-turn conversations only).\n",
             "## Per turn\n", per_turn_table(m),
             "correction rate at k: share correct at turn k among conversations whose turn k-1 answer was "
             "parsed and wrong (base = their number)"
             + (", with oracle feedback: the conversation stops at the first correct answer, so the feedback "
                "only ever follows a wrong one.\n" if m.get("protocol", "oracle") == "oracle" else ".\n"),
             "## Correction\n", correction_tables([m], [label])]
    if m.get("pass_at_k"):
        parts += ["## pass@k (turn-1 samples, no feedback)\n", pass_at_k_table(m)]
    extra = [f"accuracy within {m['max_turns']} turns: {_pct(m['accuracy'], m['accuracy_se'])}",
             f"problems: {m['num_problems']}, trajectories: {m['num_trajectories']}",
             f"mean characters per turn: {_num(m['response_chars'], 1)}, total generated tokens: {m['total_tokens']}",
             f"turns cut at max_new_tokens: {_pct(m['length_cut_rate'])}"]
    if m.get("wall_time_s") is not None:
        extra.append(f"wall time: {m['wall_time_s']:.1f} s")
    if m.get("skipped_conversations"):
        extra.append("conversations skipped by the rollout (context too long), not scored: "
                     f"{m['skipped_conversations']}")
    if m.get("ended_early"):
        extra.append(f"unsolved conversations that ended before turn {m['max_turns']}: {m['ended_early']}")
    parts += ["## Totals\n", "".join(f"- {e}\n" for e in extra)]
    return "\n".join(parts)


def paired_difference(a: dict[str, Any], b: dict[str, Any], k: int) -> tuple[float | None, float | None, int]:
    """succ@k of run b minus run a over their shared problems, with the paired standard error.

    Pairing by problem removes the problem-difficulty variance both runs share, so it judges a
    difference of a few points far better than two independent standard errors.
    """
    pa, pb = a.get("per_problem") or {}, b.get("per_problem") or {}
    shared = [p for p in pa if p in pb and k <= len(pa[p]) and k <= len(pb[p])]
    if not shared:
        return None, None, 0
    d = [pb[p][k - 1] - pa[p][k - 1] for p in shared]
    mean = sum(d) / len(d)
    if len(d) < 2:
        return mean, None, len(d)
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
    return mean, se, len(d)


def load_metrics(run_dir: str | Path) -> dict[str, Any]:
    p = Path(run_dir)
    f = EvalDir(p).metrics if p.is_dir() else p
    if not f.is_file():
        raise DriftError(f"{p}: no {f.name} (not an eval run directory)")
    m = read_record(f)
    missing = [k for k in ("max_turns", "succ_at_k", "succ_at_k_se", "num_problems") if k not in m]
    if missing:
        raise DriftError(f"{f}: missing key {missing[0]!r} (not a drift metrics file)")
    return m


def plot_succ_at_k(metrics_list: Sequence[dict[str, Any]], labels: Sequence[str], output_png: str | Path) -> None:
    """succ@k against k, one line with standard-error bars per run (matplotlib, no pyplot state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.add_subplot()
    for label, m in zip(labels, metrics_list):
        ks = list(range(1, m["max_turns"] + 1))
        ys = [100 * v for v in m["succ_at_k"]]
        err = [100 * (s or 0.0) for s in m["succ_at_k_se"]]
        ax.errorbar(ks, ys, yerr=err, marker="o", capsize=3, label=label)
    enum = next((m["enumeration_baseline"] for m in metrics_list if m.get("enumeration_baseline")), None)
    if enum:
        ax.plot(range(1, len(enum) + 1), [100 * v for v in enum], ls=":", color="grey",
                label="never repeat a letter (k / options)")
    ax.set_xlabel("turn k")
    ax.set_ylabel("succ@k (%)")
    ax.set_xticks(range(1, max(m["max_turns"] for m in metrics_list) + 1))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(output_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)


@dataclass
class CompareConfig:
    dirs: list[str] = option([], "eval directories (each holds metrics.json); the first is the baseline", result=False)
    labels: list[str] | None = option(None, "one label per directory, comma-separated (default: the directory names)")
    plot: str | None = option(None, "also draw succ@k: a .png path, or a directory (DIR/succ_at_k.png); none: no plot",
                              result=False)


def plot_path(plot: str) -> Path:
    """Where `--plot` writes: the .png path itself, or `succ_at_k.png` inside a directory."""
    p = Path(plot)
    if p.is_dir() or plot.endswith("/"):
        return p / PLOT_FILE  # the name a run directory uses too
    if p.suffix.lower() != ".png":
        raise DriftError(f"--plot {plot}: give a .png path or an existing directory")
    return p


def run_compare(cfg: CompareConfig) -> str:
    """`drift compare`: side-by-side table of eval runs, paired differences against the first, and
    (with `plot`) a succ@k plot; returns the markdown, ending with the plot's path."""
    if not cfg.dirs:
        raise DriftError("compare needs at least one eval directory")
    if cfg.labels is not None and len(cfg.labels) != len(cfg.dirs):
        raise DriftError(f"{len(cfg.labels)} labels given for {len(cfg.dirs)} directories")
    png = ensure_writable(plot_path(cfg.plot), is_file=True) if cfg.plot else None
    metrics = [load_metrics(d) for d in cfg.dirs]
    labels = cfg.labels
    if labels is None:
        names = [run_label(d) for d in cfg.dirs]
        labels = names if len(set(names)) == len(names) else list(cfg.dirs)
    text = markdown_table(metrics, labels)
    same = [(label, m) for label, m in zip(labels, metrics) if protocol_of(m) == protocol_of(metrics[0])]
    if len(same) > 1:  # succ@k of another protocol measures something else: not paired with the first
        text += "\n" + _paired_table([m for _, m in same], [label for label, _ in same])
    text += "\nCorrection, by protocol (percent [95% interval]):\n\n" + correction_tables(metrics, labels)
    if png is not None:
        plot_succ_at_k(metrics, labels, png)
        text += f"\nplot: {png}\n"
        if plot_correction(metrics, labels, png.with_name(CORRECTION_PLOT_FILE)):
            text += f"correction plot: {png.with_name(CORRECTION_PLOT_FILE)}\n"
    return text


def protocol_of(m: dict[str, Any]) -> str:
    """The protocol an eval ran under (metrics written before protocols existed: the oracle loop)."""
    return m.get("protocol", "oracle")


def _paired_table(metrics: Sequence[dict[str, Any]], labels: Sequence[str]) -> str:
    base = metrics[0]
    lines = [f"Paired difference in succ@T against {labels[0]} (points ± paired se, shared problems):\n",
             "| run | k | Δ succ@k | shared |", "|---|---:|---:|---:|"]
    for label, m in zip(labels[1:], metrics[1:]):
        k = min(base["max_turns"], m["max_turns"])
        d, se, n = paired_difference(base, m, k)
        diff = "–" if d is None else f"{100 * d:+.1f}" + ("" if se is None else f" ± {100 * se:.1f}")
        lines.append(f"| {label} | {k} | {diff} | {n} |")
    return "\n".join(lines) + "\n"
