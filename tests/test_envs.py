"""Environments: the Step record, loading and calling (with one clear error per failure), the built-in
environments, a rollout through a user's environment, and the CLI keys."""

from __future__ import annotations

import pytest

from drift import DriftError
from drift.cli import build_parser
from drift.config import from_cli
from drift.env import EnvConfig, Episode, Step, make_turn
from drift.envs.runner import EnvRunner, env_identity
from drift.records import Trajectory, read_trajectories, return_inputs
from drift.rollout import BackendStats, GenOutput, RolloutConfig, run_rollout
from drift.tasks import Problem, TaskSpec, load_tasks


def test_make_turn_success_reward_and_info():
    # info.correct decides success where given; the reward is stored only where it is not the status's 0/1
    t = make_turn("<think>hm</think> 7", Step(0.25, False, None, {"correct": False, "said": "7"}), 3, "stop")
    assert (t.status, t.correct, t.reward, t.info, t.answer, t.answer_norm) == ("wrong", False, 0.25, {"said": "7"}, "7", "7")
    t = make_turn("x", Step(0.5, True), 0, "stop")  # no info.correct: success = reward > 0
    assert t.correct and t.reward == 0.5
    t = make_turn("x", Step(1.0, True, None, {"status": "correct", "answer": "X Y"}), 0, "stop")
    assert t.correct and t.reward is None and t.answer_norm == "xy" and t.info == {}
    t = make_turn("x", Step(0.0, False, None, {"status": "unparseable", "answer": None}), 0, "stop")
    assert (t.status, t.answer, t.reward) == ("unparseable", None, None)


def test_turn_rewards_feed_the_return():
    traj = Trajectory("p", 0, [], [make_turn("a", Step(0.25, False, None, {"correct": False}), 0, "stop"),
                                   make_turn("b", Step(1.0, True), 0, "stop")], gold="b", success_turn=2)
    assert return_inputs(traj.to_json(), "t").turn_rewards == [0.25, 1.0]
    assert Trajectory.from_json(traj.to_json()) == traj


class ScriptBackend:
    """Answers `script[(prompt_id, sample_idx)][turn - 1]`."""

    name = "script"

    def __init__(self, script):
        self.script, self.stats, self.seen = script, BackendStats(), []

    def generate(self, requests, params):
        self.seen += [r.messages for r in requests]
        return [[GenOutput(text=self.script[c][r.turn - 1], tokens=1, finish_reason="stop") for c in r.conv_ids]
                for r in requests]

    def release(self, conv_ids):
        pass

    def close(self):
        pass


def rollout(tmp_path, probs, script, **kw):
    cfg = RolloutConfig(output=str(tmp_path / "r"), n=2, max_turns=3, **kw)
    manifest = run_rollout(cfg, probs, ScriptBackend(script))
    return manifest, {t.key: t for t in read_trajectories(tmp_path / "r" / "trajectories")}


@pytest.mark.parametrize("in_process", [False, True])
def test_rollout_through_a_user_environment(tmp_path, in_process):
    probs = [Problem(id="a", question="?", answer=""), Problem(id="b", question="?", answer="")]
    script = {("a", 0): ["go"], ("a", 1): ["no", "stop", "go"], ("b", 0): ["x", "y", "z"], ("b", 1): ["go"]}
    manifest, trajs = rollout(tmp_path, probs, script, env="envs_for_tests:Echo",
                              env_args={"word": "go", "in_process": in_process})
    t = trajs[("a", 1)]
    assert t.success_turn == 3 and [turn.reward for turn in t.turns] == [0.25, 0.25, None]
    assert t.messages == [{"role": "user", "content": "Say go (a)"}, {"role": "assistant", "content": "no"},
                          {"role": "user", "content": "not no"}, {"role": "assistant", "content": "stop"},
                          {"role": "user", "content": "not stop"}, {"role": "assistant", "content": "go"}]
    assert t.turns[0].info == {"said": "no"}
    assert trajs[("b", 0)].success_turn is None and len(trajs[("b", 0)].turns) == 3
    assert manifest["settings"]["env"] == "envs_for_tests:Echo" and manifest["settings"]["env_version"] == "2"
    assert manifest["summary"]["accuracy"] == 0.75


def test_environment_identity_is_in_the_settings(tmp_path, monkeypatch):
    cfg = EnvConfig(env="envs_for_tests:Echo", env_args={"word": "go"})
    assert env_identity(cfg) == {"env_factory": "envs_for_tests:Echo", "env_version": "2"}
    assert env_identity(EnvConfig()) == {"env_factory": "drift.envs.try_again:TryAgain", "env_version": "1"}
    probs = [Problem(id="a", question="?", answer="")]
    rollout(tmp_path, probs, {("a", 0): ["go"], ("a", 1): ["go"]}, env="envs_for_tests:Echo")
    import envs_for_tests

    monkeypatch.setattr(envs_for_tests.Echo, "version", "3")
    monkeypatch.setattr("drift.envs.runner._BUILT", {})
    with pytest.raises(DriftError, match=r"env_version: '2' -> '3'"):
        rollout(tmp_path, probs, {("a", 0): ["go"], ("a", 1): ["go"]}, env="envs_for_tests:Echo", resume=True)


BAD = [
    ("no_such_module_xyz:make", {}, r"^environment no_such_module_xyz:make: cannot import module 'no_such_module_xyz' "
                                    r"\(ModuleNotFoundError: No module named 'no_such_module_xyz'\)$"),
    ("envs_for_tests:nope", {}, r"^environment envs_for_tests:nope: module 'envs_for_tests' has no factory 'nope'$"),
    ("envs_for_tests:raising_factory", {}, r"^environment envs_for_tests:raising_factory: the factory "
                                           r"envs_for_tests:raising_factory raised ValueError: no such level$"),
    ("envs_for_tests:NoStep", {}, r"^environment envs_for_tests:NoStep: the factory returned NoStep, which has no step\(\) method$"),
    ("envs_for_tests:Echo", {"colour": 1}, r"^environment envs_for_tests:Echo: the factory envs_for_tests:Echo raised "
                                           r"TypeError: .*unexpected keyword argument 'colour'$"),
    ("nonsense", {}, r"^environment 'nonsense': not a built-in \(try-again, hint, reference-full, reference-simple, code\)"),
]


@pytest.mark.parametrize("env,args,match", BAD)
def test_bad_environment_factories(env, args, match):
    with pytest.raises(DriftError, match=match):
        EnvRunner(EnvConfig(env=env, env_args=args))


CALLS = [
    ("reset-raises", r"reset\(\) on problem 'a', turn 1, raised KeyError: 'question'"),
    ("reset-type", r"reset\(\) on problem 'a', turn 1, returned messages that is str, not a list of \{role, content\} messages"),
    ("step-raises", r"step\(\) on problem 'a', turn 1, raised RuntimeError: grader offline"),
    ("step-hangs", r"step\(\) on problem 'a', turn 1, did not return within 1 s \(check_timeout\)"),
    ("step-type", r"step\(\) on problem 'a', turn 1, returned dict, not drift.env.Step"),
    ("step-reward", r"step\(\) on problem 'a', turn 1, returned a Step whose reward is nan, not a finite number"),
]


@pytest.mark.parametrize("how,match", CALLS)
@pytest.mark.parametrize("in_process", [False, True])
def test_bad_environment_calls_are_one_line_naming_problem_and_turn(tmp_path, how, match, in_process):
    if how == "step-hangs" and in_process:
        pytest.skip("an in-process environment runs in the caller: only pooled calls have a time limit")
    probs = [Problem(id="a", question="?", answer="")]
    with pytest.raises(DriftError, match=r"^environment envs_for_tests:Broken: " + match + "$") as e:
        rollout(tmp_path, probs, {("a", 0): ["go"], ("a", 1): ["go"]}, env="envs_for_tests:Broken",
                env_args={"how": how, "in_process": in_process}, check_timeout=1.0)
    assert "\n" not in str(e.value)


def test_a_failing_step_can_be_recorded_as_a_failed_conversation(tmp_path):
    probs = [Problem(id="a", question="?", answer="")]
    manifest, trajs = rollout(tmp_path, probs, {("a", 0): ["go"], ("a", 1): ["go"]}, env="envs_for_tests:Broken",
                              env_args={"how": "step-raises"}, env_failures="record")
    turns = trajs[("a", 0)].turns
    assert len(turns) == 1 and turns[0].status == "wrong" and trajs[("a", 0)].success_turn is None
    assert "raised RuntimeError: grader offline" in turns[0].info["env_error"]
    assert manifest["status"] == "complete"


def test_a_stopped_run_keeps_what_it_wrote(tmp_path):
    probs = [Problem(id=f"p{i}", question="?", answer="") for i in range(3)]
    script = {(p.id, i): ["go"] for p in probs for i in range(2)}
    with pytest.raises(DriftError, match=r"step\(\) on problem 'p1', turn 1, raised RuntimeError: grader offline"):
        rollout(tmp_path, probs, script, env="envs_for_tests:Broken", env_args={"how": "step-raises-p1"}, max_live=2)
    on_disk = read_trajectories(tmp_path / "r" / "trajectories")
    assert sorted(t.key for t in on_disk) == [("p0", 0), ("p0", 1)]  # p0's group ended before p1 was judged
    assert (tmp_path / "r" / "manifest.json").exists()


def mul_problem():
    return load_tasks(TaskSpec(tasks="mul", num_problems=1, split="train"))[0]


def judge(env, cfg_kw, problem, answers):
    cfg = EnvConfig(env=env, **cfg_kw)
    runner = EnvRunner(cfg)
    ep = Episode(problem, 0, runner.resets([problem])[0], cfg.max_turns)
    for a in answers:
        ep.answer(a)
        ep.apply(runner.steps([ep])[0])
    return ep


def test_hint_says_which_way_a_number_is_off():
    p = mul_problem()
    gold = int(p.answer)
    ep = judge("hint", {"max_turns": 4}, p, [str(gold + 5), str(gold - 1), "no idea", str(gold)])
    users = [m["content"] for m in ep.messages if m["role"] == "user"][1:]
    assert users == ["Your answer is too high.", "Your answer is too low.", "I could not find a number in your answer."]
    assert ep.trajectory.success_turn == 4
    ep = judge("hint", {"max_turns": 2, "env_args": {"high": "{answer} is more than it."}}, p, [str(gold + 1)])
    assert ep.messages[-1]["content"] == f"{gold + 1} is more than it."


def test_reference_prompt_modes():
    p = mul_problem()
    ep = judge("reference-full", {"max_turns": 3}, p, ["<think>hm</think><answer>1</answer>"])
    system, first, _, second = ep.messages
    assert system["role"] == "system" and "<answer>" in system["content"]
    assert first["content"] == f"Turn 1: State: {p.question}\n{p.instruction}\nYou have 3 actions left."
    assert second["content"] == (f"Turn 2: State: {p.question}\n{p.instruction}\nYour last answer: 1. Reward: 0. "
                                 "Incorrect. Please think again.\nYou have 2 actions left.")
    ep = judge("reference-simple", {"max_turns": 3}, p, ["<answer>1</answer>", f"<answer>{p.answer}</answer>"])
    assert ep.messages[1]["content"] == f"{p.question}\n{p.instruction}"
    assert ep.messages[3]["content"] == "Incorrect. Please think again." and ep.trajectory.success_turn == 2


def test_env_arg_flags_and_config_tables(tmp_path):
    parser = build_parser("rollout")
    f = tmp_path / "c.toml"
    f.write_text('env = "code"\n[env_args]\ntime_limit = 2.0\nmemory_mb = 256\n')
    args = parser.parse_args(["rollout", "--env-arg", "memory_mb=128", "--env-arg", "partial_credit=true",
                              "--env-arg", "note=a=b"])
    cfg = from_cli(RolloutConfig, args, str(f))
    assert cfg.env == "code" and cfg.env_args == {"time_limit": 2.0, "memory_mb": 128, "partial_credit": True, "note": "a=b"}
    with pytest.raises(DriftError, match=r"config key 'env_args' takes key=value items, got 'oops'"):
        from_cli(RolloutConfig, parser.parse_args(["rollout", "--env-arg", "oops"]))


def test_the_example_environment_of_the_usage_doc(tmp_path, monkeypatch):
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "usage.md").read_text()
    code = doc.split("`my_envs.py` somewhere on the Python path:\n\n```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) <= 25
    (tmp_path / "my_envs.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    probs = [Problem(id="mul-7x8", question="What is 7 x 8?", answer="56")]
    # a worker count of its own: a pool started now, whose spawned workers see tmp_path
    manifest, trajs = rollout(tmp_path, probs, {("mul-7x8", 0): ["54", "fifty-six", "56"], ("mul-7x8", 1): ["56"]},
                              env="my_envs:OffBy", env_args={"tolerance": 0}, check_workers=5)
    t = trajs[("mul-7x8", 0)]
    assert [m["content"] for m in t.messages if m["role"] == "user"][1:] == ["You are off by -2.",
                                                                            "Give one integer, nothing else."]
    assert [turn.status for turn in t.turns] == ["wrong", "unparseable", "correct"] and t.turns[0].info == {"off": -2}
    assert manifest["settings"]["env_version"] == "1"


def test_every_sampling_stage_takes_the_environment(tmp_path):
    """drift run: [rollout]'s env and env_args reach the held-out eval (unless [eval] sets its own) and the online arm,
    whose learning-curve eval inherits them too."""
    from drift.config import build
    from drift.online.run import eval_config as online_eval
    from drift.pipeline import RunConfig

    env = {"env": "hint", "env_args": {"high": "Lower."}}
    data = {"output": str(tmp_path / "run"),
            "rollout": {"tasks": "mul", "split": "train", "num_problems": 3, "n": 2, **env},
            "eval": {"tasks": "mul", "split": "test", "num_problems": 3},
            "arms": {"drift": {"method": "drift"}, "grpo": {"method": "online"}}}
    cfg = build(RunConfig, data)
    assert (cfg.rollout_config().env, cfg.rollout_config().env_args) == ("hint", {"high": "Lower."})
    assert (cfg.eval_config("base").env, cfg.eval_config("drift").env_args) == ("hint", {"high": "Lower."})
    online = cfg.arm("grpo").online_config(cfg)
    assert (online.env, online.env_args) == ("hint", {"high": "Lower."})
    assert online_eval(online, "m", tmp_path / "e").env == "hint"
    data["eval"] = {**data["eval"], "env": "try-again", "env_args": {}}
    assert build(RunConfig, data).eval_config("base").env == "try-again"


def test_drift_run_with_the_hint_environment(tmp_path, tiny_model_dir):
    """The whole pipeline (rollout, weights, train, eval) in a non-default environment, from the CLI."""
    from drift.cli import main

    f = tmp_path / "run.toml"
    f.write_text(f'''output = "{tmp_path / 'run'}"
model = "{tiny_model_dir}"
[rollout]
tasks = "mul"
split = "train"
num_problems = 2
n = 2
max_turns = 2
max_new_tokens = 4
env = "hint"
[rollout.env_args]
unreadable = "A number, please."
[train]
epochs = 1
batch_size = 2
save_steps = 0
[eval]
tasks = "mul"
split = "test"
num_problems = 2
max_turns = 2
max_new_tokens = 4
[arms.drift]
method = "drift"
train = {{min_weight = 0.0}}
''')
    assert main(["run", str(f)]) == 0
    for stage in ("rollout", "eval/base/rollout", "eval/drift/rollout"):
        manifest = __import__("json").loads((tmp_path / "run" / stage / "manifest.json").read_text())
        assert manifest["settings"]["env"] == "hint" and manifest["settings"]["env_version"] == "1"
    hints = {"Your answer is too high.", "Your answer is too low.", "A number, please."}
    trajs = read_trajectories(tmp_path / "run" / "eval" / "base" / "rollout" / "trajectories")
    feedback = {m["content"] for t in trajs for m in t.messages[2:] if m["role"] == "user"}
    assert feedback and feedback <= hints


def test_no_oracle_is_refused_for_a_plug_in_environment():
    from drift.envs.runner import env_spec

    with pytest.raises(DriftError, match="oracle = false .* built-in environments only"):
        env_spec(EnvConfig(env="tests.envs_for_tests:Echo", oracle=False))
