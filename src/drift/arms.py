"""The arms of a `drift run` and the names of their steps.

An arm is one way of making a model from the reference one. Each kind of arm is one class here:
it builds the typed configs of its stages from the run's tables, lists its steps (each with the
record it would write and the steps it reads), and says which of the run's evaluations are its
rows and what its model cost. `drift.pipeline` plans and runs the steps; `drift.report` and
docs/tables.py render what the arms return.

    BaseArm     the reference model itself, evaluated as arm `base`
    OfflineArm  drift, sft, rft, refit, swift: weights the shared rollout and trains on it
                (rounds >= 2: round k samples afresh from round k-1's model)
    OnlineArm   online RL: samples from its own policy as it trains

Step names (`StepId`) are built and parsed here and nowhere else:

    rollout                      the shared rollout
    rollout/<arm>/round-<k>      a later round's rollout (k >= 2)
    weights/<arm>[/round-<k>]    its weights (round 1 has no round part)
    weights/<arm>/round-<k>/union   what round k trains on when it is several parts: the rounds 1..k
                                 (round_data = union) and the correction contexts (planted)
    rollout/<arm>[/round-<k>]/planted   the correction contexts of round k (planted = true)
    weights/<arm>[/round-<k>]/planted   their weights
    train/<arm>[/round-<k>]      its training
    online/<arm>                 an online arm's run
    eval/<arm>                   the evaluation of an arm's model (an iterated arm's last round)
    eval/<arm>/round-<k>         the evaluation of an earlier round's model
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from drift import DriftError
from drift.config import build, derive_seed, option
from drift.evaluate import EvalConfig, inherit_environment
from drift.evaluate import run_eval as _run_eval
from drift.evaluate import stage_record as eval_record
from drift.ledger import Cost
from drift.online import run as online
from drift.online.config import OnlineConfig
from drift.rollout import engine
from drift.rollout.config import RolloutConfig
from drift.rundir import EvalDir, RunDir, TrainDir, read_record
from drift.tasks import Problem
from drift.train import trainer
from drift.train.optim import OPTIM_KEYS
from drift.train.trainer import TrainConfig
from drift.weights import ReturnConfig, WeightsConfig, stage_record as weights_stage_record
from drift.weights import run_weights, union, union_record, weights_record

if TYPE_CHECKING:  # the run config holds its arms; the arms read its tables
    from drift.pipeline import RunConfig

Record = dict[str, Any]
Records = Mapping[str, Record]  # step name -> the record on disk
STAGE_NAMES = ("rollout", "weights", "train", "online", "eval")
BASE = "base"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_arm_name(name: str) -> str:
    """An arm name is a folder name and a part of step names: letters, digits, '_', '.', '-'."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise DriftError(f"arm name {name!r} is not allowed: use letters, digits, '_', '.' and '-', starting with "
                         "a letter or digit (it names the arm's folders and steps)")
    if name == BASE:
        raise DriftError("arm name 'base' is reserved for the reference model")
    return name


@dataclass(frozen=True)
class StepId:
    """The name of one step: stage, the arm it belongs to (none for the shared rollout), the
    round it is spelled with (none: the arm's own step) and a part of it (`union`)."""

    stage: Literal["rollout", "weights", "train", "online", "eval"]
    arm: str | None = None
    round: int | None = None
    part: str | None = None

    def __post_init__(self) -> None:
        if self.stage not in STAGE_NAMES:
            raise ValueError(f"unknown stage {self.stage!r}")
        if (self.round is not None or self.part is not None) and self.arm is None:
            raise ValueError("a round or part needs an arm")

    def __str__(self) -> str:
        parts = [self.stage] + ([self.arm] if self.arm is not None else [])
        parts += [f"round-{self.round}"] if self.round is not None else []
        return "/".join(parts + ([self.part] if self.part is not None else []))

    @classmethod
    def parse(cls, name: str) -> StepId:
        parts = name.split("/")
        stage, rest = parts[0], parts[1:]
        arm = rest.pop(0) if rest else None
        k = None
        if rest and rest[0].startswith("round-") and rest[0][6:].isdigit():
            k = int(rest.pop(0)[6:])
        if stage not in STAGE_NAMES or len(rest) > 1:
            raise DriftError(f"not a step name: {name!r}")
        return cls(stage, arm, k, rest[0] if rest else None)  # type: ignore[arg-type]

    @property
    def pipeline_stage(self) -> str:
        """The stage of `--from` this step belongs to: an online arm trains."""
        return "train" if self.stage == "online" else self.stage


@dataclass
class Step:
    """One stage of one arm: where its record lives, the record a run would write, how to run it."""

    id: StepId
    record_path: Path
    expected: Record
    run: Callable[[], Any]
    after: tuple[str, ...] = ()  # the names of the steps whose outputs it reads

    @property
    def name(self) -> str:
        return str(self.id)

    @property
    def stage(self) -> str:
        return self.id.pipeline_stage


@dataclass(frozen=True)
class ResultRow:
    """One held-out evaluation of an arm: the row's label (`drift`, `drift@2`), the arm, its eval
    step and the round whose model it evaluated (1 for single-round arms)."""

    label: str
    arm: str
    step: str
    round: int


@dataclass
class ArmConfig:
    """One arm's table in a `drift run` config. The offline arms (drift, sft, rft, refit, swift)
    weight the shared rollouts and train on them; the online arm samples from its own policy as it
    trains, in the environment of [rollout] and with the return of [weights]."""

    method: str = option("drift", "drift, sft, rft, refit, swift (offline), or online")
    weights: dict[str, Any] = option({}, "weights-stage keys for this arm (beta, gamma, degenerate, ...); an online "
                                     "arm takes its return keys and beta from here and [weights]")
    train: dict[str, Any] = option({}, "train-stage keys for this arm on top of the shared [train] table (an online "
                                   "arm: its optimization keys, lr, weight_decay, lora, ...)")
    online: dict[str, Any] = option({}, "drift online keys of an online arm (iterations, batch_prompts, lr, kl, "
                                    "eval_every, ...) on top of [rollout]'s and [train]'s")
    rounds: int = option(1, "iterated DRIFT (offline arms): round k samples the training prompts afresh from "
                         "round k-1's model, weights them against it, and trains")
    round_data: Literal["continue", "union"] = option(
        "continue", "rounds >= 2: continue trains round k-1's model on round k's rows; union trains the base model "
        "on the rows of rounds 1..k (ReST-EM)")
    planted: bool = option(False, "offline arms: also train on correction contexts. Each round plants its own "
                           "rollout's most frequent wrong first answer to every training prompt, samples n "
                           "continuations after it (turns 2..max_turns, the round's model), weights them among "
                           "themselves (the continuations of the same mistake) and trains on them beside its rows")
    planted_n: int | None = option(None, "planted = true: continuations sampled after each planted answer (default: "
                                   "the rollout's n); more make a correction more likely to appear in its group")

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise DriftError(f"config key 'rounds' must be >= 1, got {self.rounds}")
        if self.rounds > 1 and not self.offline:
            raise DriftError("rounds apply to offline arms; an online arm samples afresh at every iteration already")
        if self.planted and not self.offline:
            raise DriftError("planted applies to offline arms; an online arm samples its own conversations")
        if self.planted_n is not None and (not self.planted or self.planted_n < 1):
            raise DriftError(f"config key 'planted_n' must be >= 1 and needs planted = true, got {self.planted_n}")

    @property
    def offline(self) -> bool:
        return self.method != "online"


@dataclass(frozen=True)
class Arm:
    """What every kind of arm answers; `steps` needs the run's problems and the shared rollout's record."""

    name: str
    config: ArmConfig

    methods: ClassVar[tuple[str, ...]] = ()
    rounds: ClassVar[int] = 1

    def model_dir(self, run: RunConfig) -> Path:
        raise NotImplementedError

    def steps(self, run: RunConfig, plan: Plan) -> list[Step]:
        raise NotImplementedError

    def uses_shared_rollout(self) -> bool:
        return False

    def rows(self, recs: Records) -> list[ResultRow]:
        """Every finished held-out evaluation of the arm, in order: one per round of an iterated
        arm (`drift@1`, `drift@2`, ...; its last round is the arm's own evaluation)."""
        rounds = self.config.rounds
        ids = [(k, StepId("eval", self.name, None if k == rounds else k)) for k in range(1, rounds + 1)]
        return [ResultRow(self.name if rounds == 1 else f"{self.name}@{k}", self.name, str(s), k)
                for k, s in ids if str(s) in recs]

    def cost(self, recs: Records, upto: int | None = None) -> Cost:
        """What the arm's model cost to make (evaluations excluded), up to round `upto` (default: all)."""
        total = Cost()
        for name, rec in recs.items():
            s = StepId.parse(name)
            k = self._round_of(s)
            if k is not None and s.stage != "eval" and (upto is None or k <= upto):
                total = total + Cost.from_json(rec.get("cost"))
        return total

    def _round_of(self, s: StepId) -> int | None:
        """The round of this arm a step belongs to (None: not the arm's)."""
        return (s.round or 1) if s.arm == self.name else None

    @property
    def label(self) -> str:
        return f"{self.name} ({self.config.method})"

    def eval_step(self, run: RunConfig, plan: Plan, model_record: Record | None, k: int | None = None,
                  after: tuple[str, ...] = ()) -> Step:
        """The held-out evaluation of the arm's model (of its round k, for an iterated arm's earlier rounds)."""
        ec = self.eval_config(run, k)
        return Step(StepId("eval", self.name, k), EvalDir(Path(ec.output)).metrics,
                    eval_record(ec, plan.test, model_record), lambda: _run_eval(ec, plan.test), after)

    def eval_config(self, run: RunConfig, k: int | None = None) -> EvalConfig:
        model, output = str(self.model_dir(run)), run.dir.eval(self.name).path
        if k is not None:
            model, output = str(run.dir.round(self.name, k).train.path), run.dir.round(self.name, k).eval.path
        return run_eval_config(run, model, output)


def run_eval_config(run: RunConfig, model: str, output: Path) -> EvalConfig:
    return build(EvalConfig, {**inherit_environment(run.rollout, run.eval), "model": model, "output": str(output),
                              "resume": True}, "eval.")


@dataclass
class Plan:
    """What the arms' steps are planned against: the problems and the shared rollout."""

    train: list[Problem]
    test: list[Problem]
    rollout: RolloutConfig
    rollout_record: Record


@dataclass(frozen=True)
class BaseArm(Arm):
    """The reference model, evaluated as it is."""

    config: ArmConfig = dataclasses.field(default_factory=lambda: ArmConfig(method=BASE))

    def model_dir(self, run: RunConfig) -> Path:
        return Path(run.model)

    def eval_config(self, run: RunConfig, k: int | None = None) -> EvalConfig:
        return run_eval_config(run, run.model, run.dir.eval(BASE).path)

    def steps(self, run: RunConfig, plan: Plan) -> list[Step]:
        return [self.eval_step(run, plan, None)]

    def cost(self, recs: Records, upto: int | None = None) -> Cost:
        return Cost()

    @property
    def label(self) -> str:
        return BASE


@dataclass(frozen=True)
class OfflineArm(Arm):
    """Weights the shared rollout (its method's weights) and trains on them; iterated over rounds."""

    methods: ClassVar[tuple[str, ...]] = ("drift", "sft", "rft", "refit", "swift")

    def model_dir(self, run: RunConfig) -> Path:
        return run.dir.round(self.name, self.config.rounds).train.path

    def uses_shared_rollout(self) -> bool:
        return True

    def _round_of(self, s: StepId) -> int | None:
        return 1 if s.stage == "rollout" and s.arm is None else super()._round_of(s)

    def stage_configs(self, run: RunConfig, k: int = 1) -> tuple[RolloutConfig, WeightsConfig, TrainConfig]:
        """(rollout, weights, train) configs of round k; round 1's rollout is the shared one, a later
        round's samples the training prompts from round k-1's model with its own seed."""
        a, rd = self.config, run.dir.round(self.name, k)
        rc = run.rollout_config()
        if k > 1:
            previous = str(run.dir.round(self.name, k - 1).train.path)
            rc = build(RolloutConfig, {**run.rollout, "model": previous, "output": str(rd.rollout.path),
                                       "resume": True, "seed": derive_seed(rc.seed, "round", k)}, "rollout.")
        w = build(WeightsConfig, {**run.weights, **a.weights, "method": a.method, "input": str(rd.rollout.shards),
                                  "output": str(rd.weights)}, f"arms.{self.name}.weights.")
        t = {**run.train, **a.train}
        if a.method == "swift":
            t.setdefault("allow_negative_weights", True)
        model, data = run.model, str(rd.union) if self.parts(run, k)[1:] else w.output
        if k > 1:
            model = run.model if a.round_data == "union" else str(run.dir.round(self.name, k - 1).train.path)
        tc = build(TrainConfig, {**t, "model": model, "data": data, "output": str(rd.train.path)},
                   f"arms.{self.name}.train.")
        return rc, w, tc

    def planted_configs(self, run: RunConfig, k: int, rc: RolloutConfig, w: WeightsConfig
                        ) -> tuple[RolloutConfig, WeightsConfig]:
        """(rollout, weights) configs of round k's correction contexts: the round's sampling, planted
        with its own rollout's wrong first answers, under a seed of their own."""
        rd = run.dir.round(self.name, k)
        if rc.max_turns < 2:
            raise DriftError(f"arms.{self.name}.planted needs max_turns >= 2 (turn 1 is the planted answer)")
        prc = dataclasses.replace(rc, output=str(rd.planted_rollout.path), planted=str(rd.rollout.path), resume=True,
                                  seed=derive_seed(rc.seed, "planted"), n=self.config.planted_n or rc.n)
        return prc, dataclasses.replace(w, input=str(rd.planted_rollout.shards), output=str(rd.planted_weights))

    def parts(self, run: RunConfig, k: int) -> list[Path]:
        """The weighted files round k trains on: its own rows (and its correction contexts'), and with
        round_data = union every earlier round's too."""
        own = lambda j: [run.dir.round(self.name, j).weights] + (  # noqa: E731
            [run.dir.round(self.name, j).planted_weights] if self.config.planted else [])
        rounds = range(1, k + 1) if k > 1 and self.config.round_data == "union" else [k]
        return [p for j in rounds for p in own(j)]

    def check(self, run: RunConfig) -> None:
        for k in range(1, self.config.rounds + 1):
            rc, w, _ = self.stage_configs(run, k)
            if self.config.planted:
                self.planted_configs(run, k, rc, w)

    def steps(self, run: RunConfig, plan: Plan) -> list[Step]:
        """Weights, training and evaluation; for an iterated arm, every round's rollout, weights
        (union), training, and the evaluation of each earlier round."""
        a, name, steps = self.config, self.name, []
        w_recs: list[Record] = []
        w_steps: list[str] = []
        rollout, t_rec, sampled, trained = plan.rollout_record, None, "rollout", ""
        for k in range(1, a.rounds + 1):
            rc, w, t = self.stage_configs(run, k)
            rd, tag = run.dir.round(name, k), None if k == 1 else k
            if k > 1:
                rollout = engine.stage_record(rc, plan.train, t_rec)
                steps.append(Step(StepId("rollout", name, k), rd.rollout.manifest, rollout,
                                  lambda rc=rc: engine.run_rollout(rc, plan.train), (trained,)))
                sampled = steps[-1].name
            w_recs.append(weights_stage_record(w, rollout))
            steps.append(Step(StepId("weights", name, tag), weights_record(w.output), w_recs[-1],
                              lambda w=w: run_weights(w), (sampled,)))
            data_rec, data = w_recs[-1], steps[-1].name
            w_steps.append(data)
            if a.planted:
                prc, pw = self.planted_configs(run, k, rc, w)
                p_rec = engine.stage_record(prc, plan.train, t_rec if k > 1 else None, planted_record=rollout)
                steps.append(Step(StepId("rollout", name, tag, "planted"), rd.planted_rollout.manifest, p_rec,
                                  lambda prc=prc: engine.run_rollout(prc, plan.train), (sampled,)))
                w_recs.append(weights_stage_record(pw, p_rec))
                steps.append(Step(StepId("weights", name, tag, "planted"), weights_record(pw.output), w_recs[-1],
                                  lambda pw=pw: run_weights(pw), (steps[-1].name,)))
                w_steps.append(steps[-1].name)
            parts = self.parts(run, k)
            if len(parts) > 1:
                part_recs = w_recs[-len(parts):]
                data_rec = union_record(part_recs, rd.union)
                steps.append(Step(StepId("weights", name, tag, "union"), weights_record(rd.union), data_rec,
                                  lambda parts=parts, rd=rd: union(parts, rd.union), tuple(w_steps[-len(parts):])))
                data = steps[-1].name
            continued = k > 1 and a.round_data == "continue"
            t_rec = trainer.stage_record(t, data_rec, t_rec if continued else None)
            steps.append(Step(StepId("train", name, tag), rd.train.summary, t_rec,
                              lambda t=t: trainer.run_train(resumed(t)), (data, trained) if continued else (data,)))
            trained = steps[-1].name
            steps.append(self.eval_step(run, plan, t_rec, None if k == a.rounds else k, after=(trained,)))
        return steps


def resumed(t: TrainConfig) -> TrainConfig:
    """An unfinished training run with a complete checkpoint goes on from the last one."""
    if TrainDir(Path(t.output)).complete_checkpoints():
        return dataclasses.replace(t, resume_from_checkpoint="latest")
    return t


@dataclass(frozen=True)
class OnlineArm(Arm):
    """Online RL: [rollout]'s problems, environment and sampling, [weights]' return and beta,
    the optimization keys (`OPTIM_KEYS`) written in [train] and its own `train` table, then its
    own `online` keys, which win; a key written nowhere keeps the online default
    (`drift.train.optim.ONLINE_PRESET`). Its learning curve is evaluated on [eval]'s held-out
    problems."""

    methods: ClassVar[tuple[str, ...]] = ("online",)

    def model_dir(self, run: RunConfig) -> Path:
        return run.dir.online(self.name).path

    def online_config(self, run: RunConfig) -> OnlineConfig:
        a = self.config
        ret = {k: v for k, v in {**run.weights, **a.weights}.items() if k in ReturnConfig.__dataclass_fields__
               or (k == "beta" and v != "auto")}  # an auto beta is chosen from DRIFT's rollouts: set it here
        shared = {k: v for k, v in run.rollout.items()  # it samples in memory, in one process
                  if k not in ("workers", "executor", "num_actors", "num_cpus", "num_gpus", "ray_address")}
        optim = {k: v for k, v in {**run.train, **a.train}.items() if k in OPTIM_KEYS}  # lr, LoRA, ...: as written
        return build(OnlineConfig, {**shared, **optim, **ret, **a.online, "model": run.model, "eval": run.eval,
                                    "output": str(run.dir.online(self.name).path), "resume": True},
                     f"arms.{self.name}.online.")

    def check(self, run: RunConfig) -> None:
        self.online_config(run)

    def steps(self, run: RunConfig, plan: Plan) -> list[Step]:
        oc = self.online_config(run)
        rec = online.stage_record(oc, plan.train, None)
        sid = StepId("online", self.name)
        return [Step(sid, run.dir.online(self.name).summary, rec, lambda: online.run_online(oc)),
                self.eval_step(run, plan, rec, after=(str(sid),))]

    def curve(self, recs: Records) -> list[dict[str, Any]]:
        """The learning curve its run recorded: held-out succ@k and cost after each evaluated iteration."""
        return (recs.get(str(StepId("online", self.name))) or {}).get("curve") or []

    def curve_label(self, point: dict[str, Any]) -> str:
        """The row label of one point of the learning curve: `online@30`, after iteration 30."""
        return f"{self.name}@{point['iteration']}"

    def curve_metrics(self, run_dir: RunDir, point: dict[str, Any]) -> Record | None:
        """The metrics record of one point of the learning curve (its evaluation lies in the online run)."""
        return read_record(EvalDir(run_dir.online(self.name).path / point["metrics"]).metrics)


ARM_KINDS: tuple[type[Arm], ...] = (OfflineArm, OnlineArm)


def make_arm(name: str, config: ArmConfig) -> Arm:
    """The arm of a config table; its name checked once here."""
    check_arm_name(name)
    for kind in ARM_KINDS:
        if config.method in kind.methods:
            return kind(name, config)
    methods = [m for kind in ARM_KINDS for m in kind.methods]
    raise DriftError(f"config key 'arms.{name}.method' must be one of {methods}, got {config.method!r}")
