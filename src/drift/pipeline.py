"""`drift run` and `drift demo`: rollout -> weights -> train -> eval -> report in one run directory.

Layout of a run directory (each stage reads only the files of the stages before it):

    config.json               the resolved config of the run
    rollout/                  trajectories/shard-*.jsonl + manifest.json   (shared by every arm)
    weights/<arm>.jsonl       weighted rows, and <arm>.weights.json diagnostics
    train/<arm>/              save_pretrained checkpoint + train_summary.json
    eval/base/, eval/<arm>/   metrics.json, metrics.md, eval trajectories
    report.md, succ_at_k.png

A stage whose complete output exists is skipped, so a rerun after a crash goes on where it
stopped; `--from STAGE` deletes the outputs of that stage and every later one first.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drift import DriftError
from drift.config import build, option, read_config_file
from drift.records import write_json

log = logging.getLogger(__name__)

STAGES = ("rollout", "weights", "train", "eval", "report")


@dataclass
class ArmConfig:
    """One weighting arm: all arms share the rollouts; each trains its own model."""

    method: str = option("drift", "weighting method: drift, sft, rft, refit, swift")
    weights: dict = option({}, "weights-stage keys for this arm (beta, gamma, degenerate, ...)")
    train: dict = option({}, "train-stage keys for this arm on top of the shared [train] table")


@dataclass
class RunConfig:
    """The pipeline's config file. Stage tables hold the keys of the stage's own config."""

    config_path: str | None = option(None, "the run's TOML/YAML config file")
    output: str = option("runs/run", "run directory")
    model: str = option("smollm2-135m", "reference model (also the base of every arm)")
    rollout: dict = option({}, "drift rollout keys (tasks, num_problems, split, n, max_turns, temperature, ...)")
    weights: dict = option({}, "drift weights keys shared by all arms (beta, gamma, penalties, degenerate)")
    train: dict = option({}, "drift train keys shared by all arms (lr, epochs, batch_size, turns, ...)")
    eval: dict = option({}, "drift eval keys (tasks, num_problems, split, max_turns, ...)")
    arms: dict = option({"drift": {"method": "drift"}}, "arm name -> {method, weights = {...}, train = {...}}")
    eval_base: bool = option(True, "also evaluate the reference model itself as arm 'base'")
    start_from: str | None = option(None, "force this stage and every later one: rollout, weights, train, eval, report",
                                    flag="--from")
    title: str = option("drift run", "title of report.md")

    def __post_init__(self) -> None:
        if self.start_from is not None and self.start_from not in STAGES:
            raise DriftError(f"config key 'start_from' must be one of {list(STAGES)}, got {self.start_from!r}")
        if not self.arms:
            raise DriftError("config key 'arms' needs at least one arm")
        self.arms = {name: arm if isinstance(arm, ArmConfig) else build(ArmConfig, arm, f"arms.{name}.")
                     for name, arm in self.arms.items()}
        if "base" in self.arms:
            raise DriftError("arm name 'base' is reserved for the reference model")
        for name in self.arms:
            self.stage_configs(name)  # unknown keys and bad values fail now, not hours later

    # --- stage configs ---------------------------------------------------------------------
    def rollout_config(self) -> Any:
        from drift.rollout.engine import RolloutConfig

        return build(RolloutConfig, {**self.rollout, "model": self.model, "output": str(self.dir / "rollout"),
                                     "resume": True}, "rollout.")

    def eval_config(self, arm: str) -> Any:
        from drift.evaluate import EvalConfig

        model = self.model if arm == "base" else str(self.dir / "train" / arm)
        return build(EvalConfig, {**self.eval, "model": model, "output": str(self.dir / "eval" / arm)}, "eval.")

    def stage_configs(self, arm: str) -> tuple[Any, Any]:
        from drift.train.trainer import TrainConfig
        from drift.weights import WeightsConfig

        a = self.arms[arm]
        w = build(WeightsConfig, {**self.weights, **a.weights, "method": a.method,
                                  "input": str(self.dir / "rollout" / "trajectories"),
                                  "output": str(self.dir / "weights" / f"{arm}.jsonl")}, f"arms.{arm}.weights.")
        t = {**self.train, **a.train}
        if a.method == "swift":
            t.setdefault("allow_negative_weights", True)
        tc = build(TrainConfig, {**t, "model": self.model, "data": w.output, "output": str(self.dir / "train" / arm)},
                   f"arms.{arm}.train.")
        return w, tc

    @property
    def dir(self) -> Path:
        return Path(self.output)


def check_disjoint(cfg: RunConfig) -> tuple[int, int]:
    """Training and test problems must be disjoint by identity (id and, for generators, the fact)."""
    from drift.rollout.engine import task_spec
    from drift.tasks import load_tasks

    train = load_tasks(task_spec(cfg.rollout_config()))
    test = load_tasks(task_spec(cfg.eval_config("base")))
    for key in ("id", "fact"):
        a = {p.id if key == "id" else p.metadata.get("fact") for p in train} - {None}
        b = {p.id if key == "id" else p.metadata.get("fact") for p in test} - {None}
        if a & b:
            raise DriftError(f"training and test problems overlap ({len(a & b)} shared by {key}, e.g. "
                             f"{sorted(a & b)[0]!r}): use split = 'train' for rollout and 'test' for eval")
    return len(train), len(test)


def _forced(cfg: RunConfig, stage: str) -> bool:
    return cfg.start_from is not None and STAGES.index(stage) >= STAGES.index(cfg.start_from)


def _clear(cfg: RunConfig) -> None:
    if cfg.start_from is None:
        return
    for stage in STAGES[STAGES.index(cfg.start_from):]:
        target = cfg.dir / stage
        if stage == "report":
            for f in ("report.md", "succ_at_k.png"):
                (cfg.dir / f).unlink(missing_ok=True)
        elif target.exists():
            log.info("--from %s: removing %s", cfg.start_from, target)
            shutil.rmtree(target)


def run_pipeline(cfg: RunConfig) -> str:
    """Run every stage that is not complete yet; return the report's markdown."""
    from drift import evaluate, report
    from drift.rollout.engine import is_complete, run_rollout
    from drift.train.trainer import run_train
    from drift.weights import run_weights

    cfg.dir.mkdir(parents=True, exist_ok=True)
    n_train, n_test = check_disjoint(cfg)
    _clear(cfg)
    write_json(cfg.dir / "config.json", dataclasses.asdict(cfg))
    log.info("run %s: %d training problems, %d held-out problems, arms %s", cfg.dir, n_train, n_test, list(cfg.arms))
    timings: dict[str, float] = {}

    def stage(name: str, done: bool, fn: Any) -> None:
        if done:
            log.info("stage %s: complete, skipped", name)
            return
        log.info("stage %s: running", name)
        t0 = time.time()
        try:
            fn()
        except DriftError as e:
            raise DriftError(f"stage {name}: {e}") from None
        except OSError as e:  # a full disk, a vanished file: name the stage; finished stages stay
            raise DriftError(f"stage {name}: {e}; finished stages are kept, rerun the same command to go on") from e
        except Exception:
            log.error("stage %s failed; finished stages are kept, rerun the same command to go on", name)
            raise
        timings[name] = time.time() - t0

    def evaluate_arm(arm: str) -> None:
        e = cfg.eval_config(arm)
        stage(f"eval/{arm}", (Path(e.output) / "metrics.json").is_file(), lambda: evaluate.run_eval(e))

    # Arm by arm (weights, train, eval), so an interrupted run already has whole arms to report.
    stage("rollout", is_complete(cfg.dir / "rollout"), lambda: run_rollout(cfg.rollout_config()))
    if cfg.eval_base:
        evaluate_arm("base")
    for arm in cfg.arms:
        w, t = cfg.stage_configs(arm)
        stage(f"weights/{arm}", Path(w.output).is_file(), lambda: run_weights(w))
        stage(f"train/{arm}", (Path(t.output) / "train_summary.json").is_file(), lambda: run_train(t))
        evaluate_arm(arm)
    return report.write_report(cfg)


@dataclass
class DemoConfig:
    output: str | None = option(None, "run directory (default: runs/demo or runs/demo-quick)")
    quick: bool = option(False, "smoke preset: a few minutes on 2 CPU cores")
    model: str = option("smollm2-135m", "reference model (default: the embedded SmolLM2-135M-Instruct)")
    start_from: str | None = option(None, "force this stage and every later one", flag="--from")


def demo_config(demo: DemoConfig) -> RunConfig:
    """The demo presets (see docs/results.md for how they were chosen)."""
    from importlib.resources import files

    name = "demo-quick" if demo.quick else "demo"
    data = read_config_file(files("drift") / "configs" / f"{name}.toml")
    data.update(model=demo.model, output=demo.output or f"runs/{name}", start_from=demo.start_from)
    return build(RunConfig, data)


def run_demo(demo: DemoConfig) -> None:
    """`drift demo`: the pipeline on the embedded default and mc-arith, then before/after examples."""
    from drift import report

    cfg = demo_config(demo)
    run_pipeline(cfg)
    report.print_console_summary(cfg)  # ends with the path of report.md
