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
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from drift import DriftError
from drift.config import build, derive_seed, option, read_config_file
from drift.evaluate import ENVIRONMENT_KEYS, EvalConfig, inherit_environment
from drift.records import write_json
from drift.rundir import EvalDir, Lock, RunDir, checkpoint_record, ensure_writable, is_complete, mismatch, read_record

log = logging.getLogger(__name__)

STAGES = ("rollout", "weights", "train", "eval", "report")


@dataclass
class ArmConfig:
    """One arm. The offline arms (drift, sft, rft, refit, swift) weight the shared rollouts and
    train on them; the online arm samples from its own policy as it trains, in the environment of
    [rollout] and with the return of [weights]."""

    method: str = option("drift", "drift, sft, rft, refit, swift (offline), or online")
    weights: dict = option({}, "weights-stage keys for this arm (beta, gamma, degenerate, ...); an online arm "
                           "takes its return keys and beta from here and [weights]")
    train: dict = option({}, "train-stage keys for this arm on top of the shared [train] table")
    online: dict = option({}, "drift online keys of an online arm (iterations, batch_prompts, lr, kl, eval_every, "
                          "...) on top of [rollout]'s")
    rounds: int = option(1, "iterated DRIFT (offline arms): round k samples the training prompts afresh from "
                         "round k-1's model, weights them against it, and trains")
    round_data: Literal["continue", "union"] = option(
        "continue", "rounds >= 2: continue trains round k-1's model on round k's rows; union trains the base model "
        "on the rows of rounds 1..k (ReST-EM)")

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise DriftError(f"config key 'rounds' must be >= 1, got {self.rounds}")
        if self.rounds > 1 and not self.offline:
            raise DriftError("rounds apply to offline arms; an online arm samples afresh at every iteration already")

    @property
    def offline(self) -> bool:
        return self.method != "online"


@dataclass
class RunConfig:
    """The pipeline's config file. Stage tables hold the keys of the stage's own config."""

    config_path: str | None = option(None, "the run's TOML/YAML config file", result=False)
    output: str = option("runs/run", "run directory", result=False)
    model: str = option("smollm2-135m", "reference model (also the base of every arm)")
    rollout: dict = option({}, "drift rollout keys (tasks, num_problems, split, n, max_turns, temperature, ...)")
    weights: dict = option({}, "drift weights keys shared by all arms (beta, gamma, penalties, degenerate)")
    train: dict = option({}, "drift train keys shared by all arms (lr, epochs, batch_size, turns, ...)")
    eval: dict = option({}, "drift eval keys (tasks, num_problems, split, ...); the environment keys "
                        f"({', '.join(ENVIRONMENT_KEYS)}) default to [rollout]'s")
    arms: dict = option({"drift": {"method": "drift"}}, "arm name -> {method, weights = {...}, train = {...}}")
    eval_base: bool = option(True, "also evaluate the reference model itself as arm 'base'")
    start_from: str | None = option(None, "redo this stage and every later one: rollout, weights, train, eval, report",
                                    flag="--from", result=False)
    jobs: int = option(1, "stages run at once, each in a worker process of its own with cores/jobs torch threads "
                       "and its own log file in the run directory's logs/ (1: one after another in this process)",
                       result=False)
    title: str = option("drift run", "title of report.md", result=False)

    def __post_init__(self) -> None:
        if self.start_from is not None and self.start_from not in STAGES:
            raise DriftError(f"config key 'start_from' must be one of {list(STAGES)}, got {self.start_from!r}")
        if not self.arms:
            raise DriftError("config key 'arms' needs at least one arm")
        if self.jobs < 1:
            raise DriftError(f"config key 'jobs' must be >= 1, got {self.jobs}")
        self.arms = {name: arm if isinstance(arm, ArmConfig) else build(ArmConfig, arm, f"arms.{name}.")
                     for name, arm in self.arms.items()}
        if "base" in self.arms:
            raise DriftError("arm name 'base' is reserved for the reference model")
        for name, arm in self.arms.items():  # unknown keys and bad values fail now, not hours later
            self.stage_configs(name, arm.rounds) if arm.offline else self.online_config(name)
        self.eval_config("base")

    @property
    def dir(self) -> RunDir:
        return RunDir(Path(self.output))

    # --- stage configs ---------------------------------------------------------------------
    def rollout_config(self) -> Any:
        from drift.rollout.config import RolloutConfig

        return build(RolloutConfig, {**self.rollout, "model": self.model, "output": str(self.dir.rollout.path),
                                     "resume": True}, "rollout.")

    def model_dir(self, arm: str) -> Path:
        """Where an arm's trained model lies (an iterated arm's: its last round's)."""
        a = self.arms[arm]
        return self.dir.round(arm, a.rounds).train.path if a.offline else self.dir.online(arm).path

    def eval_config(self, arm: str, k: int | None = None) -> EvalConfig:
        """The held-out evaluation of an arm's model (of its round k, for an iterated arm's earlier rounds)."""
        model = self.model if arm == "base" else str(self.model_dir(arm))
        output = self.dir.eval(arm).path
        if k is not None:
            model, output = str(self.dir.round(arm, k).train.path), self.dir.round(arm, k).eval.path
        return build(EvalConfig, {**inherit_environment(self.rollout, self.eval), "model": model,
                                  "output": str(output), "resume": True}, "eval.")

    def stage_configs(self, arm: str, k: int = 1) -> tuple[Any, Any, Any]:
        """(rollout, weights, train) configs of round k of an offline arm; round 1's rollout is the
        shared one, a later round's samples the training prompts from round k-1's model with its
        own seed."""
        from drift.train.trainer import TrainConfig
        from drift.weights import WeightsConfig

        a, rd = self.arms[arm], self.dir.round(arm, k)
        rc = self.rollout_config()
        if k > 1:
            previous = str(self.dir.round(arm, k - 1).train.path)
            rc = build(type(rc), {**self.rollout, "model": previous, "output": str(rd.rollout.path), "resume": True,
                                  "seed": derive_seed(rc.seed, "round", k)}, "rollout.")
        w = build(WeightsConfig, {**self.weights, **a.weights, "method": a.method, "input": str(rd.rollout.shards),
                                  "output": str(rd.weights)}, f"arms.{arm}.weights.")
        t = {**self.train, **a.train}
        if a.method == "swift":
            t.setdefault("allow_negative_weights", True)
        model, data = self.model, w.output
        if k > 1:
            model = self.model if a.round_data == "union" else str(self.dir.round(arm, k - 1).train.path)
            data = str(rd.union) if a.round_data == "union" else w.output
        tc = build(TrainConfig, {**t, "model": model, "data": data, "output": str(rd.train.path)},
                   f"arms.{arm}.train.")
        return rc, w, tc

    def online_config(self, arm: str) -> Any:
        """An online arm: [rollout]'s problems, environment and sampling, [weights]' return and beta,
        its own `online` keys; its learning curve is evaluated on [eval]'s held-out problems."""
        from drift.online.config import OnlineConfig
        from drift.weights import ReturnConfig

        a = self.arms[arm]
        ret = {k: v for k, v in {**self.weights, **a.weights}.items() if k in ReturnConfig.__dataclass_fields__
               or (k == "beta" and v != "auto")}  # an auto beta is chosen from DRIFT's rollouts: set it here
        shared = {k: v for k, v in self.rollout.items() if k != "workers"}  # it samples in memory, in one process
        return build(OnlineConfig, {**shared, **ret, **a.online, "model": self.model, "eval": self.eval,
                                    "output": str(self.dir.online(arm).path), "resume": True}, f"arms.{arm}.online.")


def check_disjoint(cfg: RunConfig) -> tuple[list, list]:
    """The training and held-out problems; they must be disjoint by identity (id and, for generators, the fact)."""
    from drift.rollout.config import task_spec
    from drift.tasks import load_tasks

    train = load_tasks(task_spec(cfg.rollout_config()))
    test = load_tasks(task_spec(cfg.eval_config("base")))
    for key in ("id", "fact"):
        a = {p.id if key == "id" else p.metadata.get("fact") for p in train} - {None}
        b = {p.id if key == "id" else p.metadata.get("fact") for p in test} - {None}
        if a & b:
            raise DriftError(f"training and test problems overlap ({len(a & b)} shared by {key}, e.g. "
                             f"{sorted(a & b)[0]!r}): use split = 'train' for rollout and 'test' for eval")
    return train, test


@dataclass
class Step:
    """One stage of one arm: where its record lives, the record a run would write, how to run it."""

    name: str  # "rollout", "weights/drift", "train/drift", "eval/base", ...
    record_path: Path
    expected: dict[str, Any]
    run: Callable[[], Any]
    after: tuple[str, ...] = ()  # the steps whose outputs it reads

    @property
    def stage(self) -> str:
        """The pipeline stage (`--from`) this step belongs to; an online arm trains."""
        stage = self.name.split("/")[0]
        return "train" if stage == "online" else stage


def plan(cfg: RunConfig, train_problems: list, test_problems: list) -> list[Step]:
    """Every step of the run in order, each with the record it would write (see the module docstring)."""
    from drift import evaluate
    from drift.online import run as online
    from drift.rollout import engine

    d = cfg.dir
    rc = cfg.rollout_config()
    rollout = engine.stage_record(rc, train_problems, None)
    steps = [Step("rollout", d.rollout.manifest, rollout, lambda: engine.run_rollout(rc, train_problems))]

    def evaluate_arm(arm: str, model_record: dict[str, Any] | None, k: int | None = None,
                     after: tuple[str, ...] = ()) -> Step:
        ec = cfg.eval_config(arm, k)
        name = f"eval/{arm}" if k is None else f"eval/{arm}/round-{k}"
        return Step(name, EvalDir(Path(ec.output)).metrics, evaluate.stage_record(ec, test_problems, model_record),
                    lambda: evaluate.run_eval(ec, test_problems), after)

    if cfg.eval_base:
        steps.append(evaluate_arm("base", None))
    for arm, a in cfg.arms.items():
        if not a.offline:
            oc = cfg.online_config(arm)
            o_rec = online.stage_record(oc, train_problems, None)
            steps += [Step(f"online/{arm}", d.online(arm).summary, o_rec, lambda oc=oc: online.run_online(oc)),
                      evaluate_arm(arm, o_rec, after=(f"online/{arm}",))]
            continue
        steps += _offline_steps(cfg, arm, rollout, train_problems, evaluate_arm)
    if all(not a.offline for a in cfg.arms.values()):
        steps = steps[1:]  # no offline arm: nothing uses the shared rollout
    return steps


def _offline_steps(cfg: RunConfig, arm: str, rollout: dict[str, Any], train_problems: list,
                   evaluate_arm: Callable[..., Step]) -> list[Step]:
    """Weights, training and evaluation of an offline arm; for an iterated one, every round's
    rollout, weights (union), training, and the evaluation of each earlier round."""
    from drift import weights
    from drift.rollout import engine
    from drift.train import trainer

    a, steps = cfg.arms[arm], []
    w_recs: list[dict[str, Any]] = []
    w_steps: list[str] = []
    t_rec, sampled, trained = None, "rollout", ""
    for k in range(1, a.rounds + 1):
        rc, w, t = cfg.stage_configs(arm, k)
        rd, tag = cfg.dir.round(arm, k), "" if k == 1 else f"/round-{k}"
        if k > 1:
            rollout = engine.stage_record(rc, train_problems, t_rec)
            sampled = f"rollout/{arm}{tag}"
            steps.append(Step(sampled, rd.rollout.manifest, rollout,
                              lambda rc=rc: engine.run_rollout(rc, train_problems), (trained,)))
        w_recs.append(weights.stage_record(w, rollout))
        steps.append(Step(f"weights/{arm}{tag}", weights.weights_record(w.output), w_recs[-1],
                          lambda w=w: weights.run_weights(w), (sampled,)))
        data_rec, data = w_recs[-1], steps[-1].name
        w_steps.append(data)
        if k > 1 and a.round_data == "union":
            parts = [cfg.dir.round(arm, j).weights for j in range(1, k + 1)]
            data_rec = weights.union_record(w_recs, rd.union)
            steps.append(Step(f"weights/{arm}{tag}/union", weights.weights_record(rd.union), data_rec,
                              lambda parts=parts, rd=rd: weights.union(parts, rd.union),
                              tuple(w_steps)))
            data = steps[-1].name
        continued = k > 1 and a.round_data == "continue"
        t_rec = trainer.stage_record(t, data_rec, t_rec if continued else None)
        steps.append(Step(f"train/{arm}{tag}", rd.train.summary, t_rec, lambda t=t: trainer.run_train(_resumed(t)),
                          (data, trained) if continued else (data,)))
        trained = steps[-1].name
        steps.append(evaluate_arm(arm, t_rec, None if k == a.rounds else k, after=(trained,)))
    return steps


def _resumed(t: Any) -> Any:
    """An unfinished training run with a complete checkpoint goes on from the last one."""
    if any(checkpoint_record(p).is_file() for p in Path(t.output).glob("checkpoint-*")):
        return dataclasses.replace(t, resume_from_checkpoint="latest")
    return t


def check(steps: list[Step]) -> list[Step]:
    """The steps to run; raise one error if any output on disk was made otherwise.

    The error names each stage whose own settings differ, with the keys; stages that differ only
    because they were built on such a stage (their input or starting model) are counted.
    """
    todo, own, built_on = [], [], []
    for step in steps:
        rec = read_record(step.record_path)
        differ = mismatch(rec, step.expected) if rec is not None else []
        mine = [d for d in differ if not d.startswith(("input:", "model: 'trained:"))]
        if mine:
            own.append((step, mine))
        elif differ:
            built_on.append(step)
        elif not is_complete(rec):
            todo.append(step)
    if not own and built_on:  # nothing changed its own settings: an input was redone under it
        own, built_on = [(built_on[0], ["made from another input: an earlier stage was redone"])], built_on[1:]
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
    from drift import report

    ensure_writable(cfg.dir.root)
    with Lock(cfg.dir.root):
        train_problems, test_problems = check_disjoint(cfg)
        _clear(cfg)
        steps = plan(cfg, train_problems, test_problems)
        todo = check(steps)
        write_json(cfg.dir.config, dataclasses.asdict(cfg))
        log.info("run %s: %d training problems, %d held-out problems, arms %s; %d of %d stages to run",
                 cfg.dir.root, len(train_problems), len(test_problems), list(cfg.arms), len(todo), len(steps))
        for step in steps:
            if step not in todo:
                log.info("stage %s: complete, skipped", step.name)
            elif cfg.jobs == 1:
                _run_step(step)
        if cfg.jobs > 1 and todo:
            from drift import jobs

            graph = [jobs.Job(s.name, s.after, run_step, (cfg, s.name), cfg.dir.log(s.name)) for s in todo]
            jobs.run_jobs(graph, cfg.jobs, {s.name for s in steps if s not in todo})
        return report.write_report(cfg, [(s.name, s.record_path) for s in steps])


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
        raise DriftError(f"stage {step.name}: {e}; finished stages are kept, rerun the same command to go on") from e
    except Exception:
        log.error("stage %s failed; finished stages are kept, rerun the same command to go on", step.name)
        raise


def load_run(path: str | Path) -> tuple[RunConfig, dict[str, dict[str, Any]]]:
    """A run directory read back: its config (from config.json) and the records of its steps on disk."""
    from drift import report

    run = RunDir(Path(path))
    if not run.config.is_file():
        raise DriftError(f"{path}: no {run.config.name} (not a `drift run` directory)")
    cfg = build(RunConfig, {**json.loads(run.config.read_text()), "output": str(path), "start_from": None})
    steps = plan(cfg, *check_disjoint(cfg))
    return cfg, report.records([(s.name, s.record_path) for s in steps])


@dataclass
class DemoConfig:
    output: str | None = option(None, "run directory (default: runs/demo or runs/demo-quick)")
    quick: bool = option(False, "smoke preset: a few minutes on 2 CPU cores")
    model: str = option("smollm2-135m", "reference model (default: the embedded SmolLM2-135M-Instruct)")
    start_from: str | None = option(None, "redo this stage and every later one", flag="--from")
    jobs: int | None = option(None, "stages run at once, in worker processes (none: the preset's)")


def demo_config(demo: DemoConfig) -> RunConfig:
    """The demo presets (see docs/results.md for how they were chosen)."""
    from importlib.resources import files

    name = "demo-quick" if demo.quick else "demo"
    data = read_config_file(files("drift") / "configs" / f"{name}.toml")
    data.update(model=demo.model, output=demo.output or f"runs/{name}", start_from=demo.start_from)
    if demo.jobs is not None:
        data["jobs"] = demo.jobs
    return build(RunConfig, data)


def run_demo(demo: DemoConfig) -> None:
    """`drift demo`: the pipeline on the embedded default and mul (the quick preset: mc-arith), then the
    evaluations with their training cost and before/after examples."""
    from drift import report

    cfg = demo_config(demo)
    run_pipeline(cfg)
    report.print_console_summary(*load_run(cfg.dir.root))  # ends with the path of report.md
