"""`drift run` and `drift demo`: every stage of every arm in one run directory, never a stale one.

The layout of the run directory is `drift.rundir.RunDir`'s. Before it runs anything, `drift run`
computes the record each stage would write (its settings and the digest of its input, along the
chain rollout -> weights -> train -> eval) and compares it with the record on disk:
  - no record yet, or an unfinished one made with the same settings: the stage runs (the rollout
    and the eval resume where they stopped, training from its last complete checkpoint);
  - a finished record with the same settings and input: the stage is skipped;
  - a record made with other settings, or from another input: one error naming every such stage
    and key, and the way out (`--from STAGE` redoes that stage and every later one, or a new
    output directory). Keys that cannot change a result (threads, inference batch sizes,
    logging) are not compared.
The held-out evaluation runs in the rollout's environment (system prompt, feedback, answer
instruction, checker and its timeout, turn limit) unless `[eval]` sets a key itself.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import shutil
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

from drift import DriftError, jobs, report
from drift.arms import BASE, Arm, ArmConfig, BaseArm, Plan, Step, StepId, check_arm_name, make_arm
from drift.config import build, differences, option, read_config_file
from drift.env import ENVIRONMENT_KEYS
from drift.evaluate import EvalConfig
from drift.records import write_json
from drift.rollout import engine
from drift.rollout.config import RolloutConfig, task_spec
from drift.rundir import (Lock, RunDir, damaged, ensure_writable, is_complete, is_space_error, mismatches, read_record,
                          space_error)
from drift.tasks import Problem, load_tasks

log = logging.getLogger(__name__)

STAGES = ("rollout", "weights", "train", "eval", "report")


@dataclass
class RunConfig:
    """The pipeline's config file. Stage tables hold the keys of the stage's own config."""

    config_path: str | None = option(None, "the run's TOML/YAML config file", result=False)
    output: str = option("runs/run", "run directory", result=False)
    model: str = option("smollm2-135m", "reference model (also the base of every arm)")
    rollout: dict = option({}, "drift rollout keys (tasks, num_problems, split, n, max_turns, temperature, ...)")
    weights: dict = option({}, "drift weights keys shared by all arms (beta, gamma, penalties, degenerate)")
    train: dict = option({}, "drift train keys shared by all arms (lr, epochs, batch_size, turns, ...); online arms "
                         "take its optimization keys (lr, schedule, weight_decay, max_grad_norm, LoRA, ...)")
    eval: dict = option({}, "drift eval keys (tasks, num_problems, split, ...); the environment keys "
                        f"({', '.join(ENVIRONMENT_KEYS)}) default to [rollout]'s")
    arms: dict[str, ArmConfig] = option({"drift": {"method": "drift"}},
                                        "arm name -> {method, weights = {...}, train = {...}}")
    eval_base: bool = option(True, "also evaluate the reference model itself as arm 'base'")
    start_from: str | None = option(None, "redo this stage and every later one: rollout, weights, train, eval, report",
                                    flag="--from", result=False)
    jobs: int = option(1, "stages run at once, each in a worker process of its own with cores/jobs torch threads "
                       "and its own log file in the run directory's logs/ (1: one after another in this process)",
                       result=False)
    title: str = option("drift run", "title of report.md", result=False)
    executor: Literal["local", "ray"] = option(
        "local", "local: stages in this process or, with jobs > 1, in worker processes; ray: every stage a Ray task "
        "on the cluster, `jobs` at once (`drift.ray_tasks`; [rollout] executor = \"ray\" also spreads the sampling)",
        result=False)
    ray_address: str | None = option(None, "executor ray: the cluster (auto, host:port, ray://host:10001; none: "
                                     "$RAY_ADDRESS, else a Ray started on this machine)", result=False)
    num_cpus: float = option(1.0, "executor ray: CPUs per stage task (its torch threads)", result=False)
    num_gpus: float = option(0.0, "executor ray: GPUs per stage task", result=False)

    def __post_init__(self) -> None:
        if self.start_from is not None and self.start_from not in STAGES:
            raise DriftError(f"config key 'start_from' must be one of {list(STAGES)}, got {self.start_from!r}")
        if not self.arms:
            raise DriftError("config key 'arms' needs at least one arm")
        if self.jobs < 1:
            raise DriftError(f"config key 'jobs' must be >= 1, got {self.jobs}")
        if self.executor == "ray" and importlib.util.find_spec("ray") is None:
            raise DriftError("executor 'ray' needs Ray: pip install 'drift-rl[ray]'")
        self.arms = {check_arm_name(name): arm if isinstance(arm, ArmConfig) else
                     build(ArmConfig, arm, f"arms.{name}.") for name, arm in self.arms.items()}
        for name, arm in self.kinds.items():  # unknown keys and bad values fail now, not hours later
            try:
                arm.check(self)
            except DriftError as e:  # its stage configs merge several tables: name the arm they were built for
                raise DriftError(f"arm {name} ({arm.config.method}): {e}") from None
        self.eval_config(BASE)

    @property
    def dir(self) -> RunDir:
        return RunDir(Path(self.output))

    @property
    def kinds(self) -> dict[str, Arm]:
        """The arms by name (each of its kind: `drift.arms`)."""
        return {name: make_arm(name, a) for name, a in self.arms.items()}

    def arm(self, name: str) -> Arm:
        return BaseArm(BASE) if name == BASE else make_arm(name, self.arms[name])

    def evaluated_arms(self) -> list[Arm]:
        """The arms whose models are evaluated, in report order: base first (if evaluated)."""
        return ([BaseArm(BASE)] if self.eval_base else []) + list(self.kinds.values())

    def rollout_config(self) -> RolloutConfig:
        """The shared rollout of the offline arms' first round."""
        return build(RolloutConfig, {**self.rollout, "model": self.model, "output": str(self.dir.rollout.path),
                                     "resume": True}, "rollout.")

    def eval_config(self, arm: str, k: int | None = None) -> EvalConfig:
        """The held-out evaluation of an arm's model (of its round k, for an iterated arm's earlier rounds)."""
        return self.arm(arm).eval_config(self, k)


def check_disjoint(cfg: RunConfig) -> tuple[list[Problem], list[Problem]]:
    """The training and held-out problems; they must be disjoint by identity (id and, for generators, the fact)."""
    train = load_tasks(task_spec(cfg.rollout_config()))
    test = load_tasks(task_spec(cfg.eval_config(BASE)))
    for key in ("id", "fact"):
        a = {p.id if key == "id" else p.metadata.get("fact") for p in train} - {None}
        b = {p.id if key == "id" else p.metadata.get("fact") for p in test} - {None}
        if a & b:
            raise DriftError(f"training and test problems overlap ({len(a & b)} shared by {key}, e.g. "
                             f"{sorted(a & b)[0]!r}): use split = 'train' for rollout and 'test' for eval")
    return train, test


def plan(cfg: RunConfig, train_problems: list[Problem], test_problems: list[Problem]) -> list[Step]:
    """Every step of the run in order, each with the record it would write (see the module docstring)."""
    rc = cfg.rollout_config()
    shared = Plan(train_problems, test_problems, rc, engine.stage_record(rc, train_problems, None))
    arms = cfg.evaluated_arms()
    steps = []
    if any(a.uses_shared_rollout() for a in arms):  # no offline arm: nothing uses the shared rollout
        steps.append(Step(StepId("rollout"), cfg.dir.rollout.manifest, shared.rollout_record,
                          lambda: engine.run_rollout(rc, train_problems)))
    for arm in arms:
        steps += arm.steps(cfg, shared)
    return steps


PLAN_KEYS = ("rounds", "round_data", "planted")  # arm keys that shape the plan (which steps, on which inputs), in no record


def plan_changes(cfg: RunConfig) -> list[str]:
    """'arms.X.rounds: 2 -> 3' for every plan key of an arm that differs from the config that last
    ran in this directory (config.json): these keys are in no stage's settings, so a change shows
    in the records only as other inputs."""
    try:
        before = json.loads(cfg.dir.config.read_text(encoding="utf-8")).get("arms") or {}
    except (OSError, ValueError, AttributeError):
        return []
    now = dataclasses.asdict(cfg)["arms"]
    return [f"arms.{name}.{d}" for name in sorted(set(before) & set(now)) if isinstance(before[name], dict)
            for d in differences({k: before[name].get(k) for k in PLAN_KEYS}, {k: now[name].get(k) for k in PLAN_KEYS})]


def check(steps: list[Step], changed_plan: list[str] = ()) -> list[Step]:
    """The steps to run; raise one error if any output on disk was made otherwise.

    The error names each stage whose own settings differ, with the keys; stages that differ only
    because they were built on such a stage (their input or starting model) are counted.
    """
    todo, own, built_on = [], [], []
    for step in steps:
        rec = read_record(step.record_path)
        differ = mismatches(rec, step.expected) if rec is not None else []
        mine = [d.text for d in differ if d.kind == "setting"]
        if mine:
            own.append((step, mine))
        elif differ:
            built_on.append(step)
        elif not is_complete(rec):
            todo.append(step)
        elif harm := damaged(step.record_path.parent, rec):
            log.warning("stage %s: complete, but its files are damaged (%s): redoing it", step.name, "; ".join(harm))
            todo.append(step)
    if not own and built_on:  # nothing changed its own settings: the plan changed, or an input was redone under it
        why = list(changed_plan) or ["made from another input: an earlier stage was redone"]
        own, built_on = [(built_on[0], why)], built_on[1:]
    if own:
        first = min(STAGES.index(s.stage) for s, _ in own)
        named = "; ".join(f"{s.name} ({', '.join(d)})" for s, d in own)
        later = f", and {len(built_on)} stage(s) built on them" if built_on else ""
        raise DriftError(f"the run directory holds outputs made with other settings: {named}{later}. Rerun with "
                         f"--from {STAGES[first]} to redo them and every later stage, or choose a new output directory")
    return todo


def _clear(cfg: RunConfig) -> None:
    if cfg.start_from is None:
        return
    for stage in STAGES[STAGES.index(cfg.start_from):]:
        if stage == "report":
            for f in (cfg.dir.report, cfg.dir.plot, cfg.dir.cost_plot):
                f.unlink(missing_ok=True)
            continue
        for target in cfg.dir.stage_dirs(stage):
            if target.exists():
                log.info("--from %s: removing %s", cfg.start_from, target)
                shutil.rmtree(target)


def run_pipeline(cfg: RunConfig) -> str:
    """Run every step that is not complete yet; return the report's markdown."""
    ensure_writable(cfg.dir.root)
    with Lock(cfg.dir.root):
        train_problems, test_problems = check_disjoint(cfg)
        _clear(cfg)
        steps = plan(cfg, train_problems, test_problems)
        todo = check(steps, plan_changes(cfg))
        write_json(cfg.dir.config, dataclasses.asdict(cfg))
        log.info("run %s: %d training problems, %d held-out problems, arms %s; %d of %d stages to run",
                 cfg.dir.root, len(train_problems), len(test_problems), list(cfg.arms), len(todo), len(steps))
        for step in steps:
            if step not in todo:
                log.info("stage %s: complete, skipped", step.name)
            elif cfg.jobs == 1 and cfg.executor == "local":
                _run_step(step)
        if (cfg.jobs > 1 or cfg.executor == "ray") and todo:
            graph = [jobs.Job(s.name, s.after, run_step, (cfg, s.name), cfg.dir.log(s.name)) for s in todo]
            ray = (dict(address=cfg.ray_address, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
                   if cfg.executor == "ray" else None)
            jobs.run_jobs(graph, cfg.jobs, {s.name for s in steps if s not in todo}, ray)
        return report.write_report(cfg, records(steps))


def run_step(cfg: RunConfig, name: str) -> None:
    """One step of the run by name (what a worker process of `jobs > 1` runs); the run directory's
    lock is held by the process that plans the run."""
    steps = {s.name: s for s in plan(cfg, *check_disjoint(cfg))}
    _run_step(steps[name])


def _run_step(step: Step) -> None:
    log.info("stage %s: running", step.name)
    try:
        step.run()
    except DriftError as e:
        raise DriftError(f"stage {step.name}: {e}") from None
    except OSError as e:  # a full disk, a vanished file: name the stage; finished stages stay
        if is_space_error(e):
            raise DriftError(f"stage {step.name}: {space_error(e.filename or '.')}") from e
        raise DriftError(f"stage {step.name}: {e}; finished stages are kept, rerun the same command to go on") from e
    except Exception:
        log.error("stage %s failed; finished stages are kept, rerun the same command to go on", step.name)
        raise


def load_run(path: str | Path) -> tuple[RunConfig, dict[str, dict[str, Any]]]:
    """A run directory read back: its config (from config.json) and the records of its steps on disk."""
    run = RunDir(Path(path))
    if not run.config.is_file():
        raise DriftError(f"{path}: no {run.config.name} (not a `drift run` directory)")
    cfg = build(RunConfig, {**json.loads(run.config.read_text()), "output": str(path), "start_from": None})
    steps = plan(cfg, *check_disjoint(cfg))
    return cfg, records(steps)


def records(steps: list[Step]) -> dict[str, dict[str, Any]]:
    """The records on disk of a run's steps, by step name (the steps not run yet left out)."""
    found = {s.name: read_record(s.record_path) for s in steps}
    return {name: r for name, r in found.items() if r is not None}


@dataclass
class DemoConfig:
    output: str | None = option(None, "run directory (default: runs/demo or runs/demo-quick)")
    quick: bool = option(False, "smoke preset: a few minutes on 2 CPU cores")
    model: str = option("smollm2-135m", "reference model (default: the embedded SmolLM2-135M-Instruct)")
    start_from: str | None = option(None, "redo this stage and every later one", flag="--from")
    jobs: int | None = option(None, "stages run at once, in worker processes (none: the preset's)")


def demo_config(demo: DemoConfig) -> RunConfig:
    """The demo presets (see docs/results.md for how they were chosen)."""
    name = "demo-quick" if demo.quick else "demo"
    data = read_config_file(files("drift") / "configs" / f"{name}.toml")
    data.update(model=demo.model, output=demo.output or f"runs/{name}", start_from=demo.start_from)
    if demo.jobs is not None:
        data["jobs"] = demo.jobs
    return build(RunConfig, data)


def run_demo(demo: DemoConfig) -> None:
    """`drift demo`: the pipeline on the embedded default and mul (the quick preset: mc-arith), then the
    evaluations with their training cost and before/after examples."""
    cfg = demo_config(demo)
    run_pipeline(cfg)
    report.print_console_summary(*load_run(cfg.dir.root))  # ends with the path of report.md
