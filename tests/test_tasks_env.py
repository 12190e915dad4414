"""Tasks (generators, files), the try-again environment rules, typed configs."""

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass

import pytest

from drift import DriftError
from drift.config import apply_overrides, build, option
from drift.env import EnvConfig, Episode
from drift.envs.runner import EnvRunner
from drift.records import Trajectory
from drift.tasks import Problem, TaskSpec, load_tasks
from drift.tasks.problem import split_of


def test_generators_deterministic_and_splits_disjoint_by_fact():
    a = load_tasks(TaskSpec(tasks="mul", num_problems=20, task_seed=3, split="train"))
    b = load_tasks(TaskSpec(tasks="mul", num_problems=20, task_seed=3, split="train"))
    assert [p.id for p in a] == [p.id for p in b]
    train = load_tasks(TaskSpec(tasks="mul", split="train"))
    test = load_tasks(TaskSpec(tasks="mul", split="test"))
    assert len(train) + len(test) == 121
    assert not {p.metadata["fact"] for p in train} & {p.metadata["fact"] for p in test}
    assert all(p.answer == str(p.metadata["a"] * p.metadata["b"]) for p in train)


def test_mc_arith_problem():
    (p,) = load_tasks(TaskSpec(tasks="mc-arith", num_problems=1, task_seed=0, split="test"))
    total = p.metadata["a"] + p.metadata["b"]
    options = p.metadata["options"]
    assert len(set(options)) == 4 and total in options
    assert p.answer == "ABCD"[options.index(total)]
    assert all(abs(o - total) in (0, 1, 2, 10) for o in options)
    assert p.checker == "choice" and p.extract == "letter"
    assert f"{p.answer}. {total}" in p.question


def test_generator_asks_for_too_many():
    with pytest.raises(DriftError, match="only"):
        load_tasks(TaskSpec(tasks="mul", num_problems=500, split="test"))


def test_jsonl_tasks_gsm8k_and_boxed_answers(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"id": "g1", "question": "2+2?", "answer": "so 4\n#### 4"}) + "\n"
                 + json.dumps({"id": "m1", "question": "half?", "answer": "it is \\boxed{\\frac{1}{2}}"}) + "\n"
                 + json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "3+3?"}],
                               "answer": 6, "checker": "numeric"}) + "\n")
    ps = load_tasks(TaskSpec(tasks=str(f)))
    assert [p.answer for p in ps] == ["4", "\\frac{1}{2}", "6"]
    assert ps[2].id == "t-3" and ps[2].checker == "numeric"
    assert ps[2].opening() == [{"role": "user", "content": "3+3?"}]  # the system prompt comes from the env


@pytest.mark.parametrize("line,match", [
    ('{"id": "a", "question": "q"}', r"t.jsonl:1: missing field 'answer'"),
    ('{"id": "a", "answer": "1"}', r"t.jsonl:1: needs 'question' or 'messages'"),
    ('{"id": "a", "question": "q", "answer": "1"}\n{"id": "a", "question": "r", "answer": "2"}', "duplicate problem id 'a'"),
    ("[1, 2]", r"t.jsonl:1: malformed JSON line"),
    ("", "no problems"),
])
def test_bad_task_files(tmp_path, line, match):
    f = tmp_path / "t.jsonl"
    f.write_text(line + "\n")
    with pytest.raises(DriftError, match=match):
        load_tasks(TaskSpec(tasks=str(f)))


def test_unknown_task_source():
    with pytest.raises(DriftError, match="not a built-in generator"):
        load_tasks(TaskSpec(tasks="nope.jsonl"))


def test_split_works_for_task_files_by_a_hash_of_the_id(tmp_path):
    """The same rule as the generators' facts: test iff the first byte of sha256(id) is odd."""
    f = tmp_path / "t.jsonl"
    ids = [f"q{i}" for i in range(40)]
    f.write_text("".join(json.dumps({"id": i, "question": "?", "answer": "1"}) + "\n" for i in ids))
    train = [p.id for p in load_tasks(TaskSpec(tasks=str(f), split="train"))]
    test = [p.id for p in load_tasks(TaskSpec(tasks=str(f), split="test"))]
    assert test == [i for i in ids if hashlib.sha256(i.encode()).digest()[0] % 2]
    assert sorted(train + test) == sorted(ids) and 10 < len(test) < 30
    assert [p.id for p in load_tasks(TaskSpec(tasks=str(f), split="test", num_problems=3))] == test[:3]
    assert len(load_tasks(TaskSpec(tasks=str(f)))) == 40  # split "all": every problem
    with pytest.raises(DriftError, match="split must be train, test or all"):
        load_tasks(TaskSpec(tasks=str(f), split="dev"))


def test_split_of_a_one_problem_file_can_be_empty(tmp_path):
    f = tmp_path / "t.jsonl"
    pid = next(f"q{i}" for i in range(10) if hashlib.sha256(f"q{i}".encode()).digest()[0] % 2 == 0)  # a train id
    f.write_text(json.dumps({"id": pid, "question": "?", "answer": "1"}) + "\n")
    with pytest.raises(DriftError, match="none of its 1 problems falls in the test split.*--split all"):
        load_tasks(TaskSpec(tasks=str(f), split="test"))


def test_generator_split_is_unchanged():
    """The generators' fact split moved to `split_of`; the facts in each half are those of before."""
    train = load_tasks(TaskSpec(tasks="mul", split="train"))
    assert len(train) == 49 and {"mul-2x2", "mul-2x3"} <= {p.id for p in train}
    assert [split_of(f) for f in ("2x2", "2x3", "2x4", "3x3")] == ["train", "train", "test", "test"]


def test_parquet_tasks_and_a_file_that_is_not_parquet(tmp_path):
    import pyarrow
    import pyarrow.parquet

    good = tmp_path / "t.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"id": ["a", "b"], "question": ["1+1?", "2+2?"], "answer": [2, 4]}), good)
    assert [(p.id, p.answer) for p in load_tasks(TaskSpec(tasks=str(good)))] == [("a", "2"), ("b", "4")]
    bad = tmp_path / "bad.parquet"
    bad.write_text('{"id": "a", "question": "q", "answer": "1"}\n')
    with pytest.raises(DriftError, match=r"bad.parquet: not a readable Parquet file \(.*magic bytes") as e:
        load_tasks(TaskSpec(tasks=str(bad)))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("row,match", [
    ({"id": "a", "question": ["what", "is", "1?"], "answer": "1"}, r"t.jsonl:1: field 'question' must be a string, got list"),
    ({"id": "a", "problem": {"text": "q"}, "answer": "1"}, r"t.jsonl:1: field 'problem' must be a string, got dict"),
    ({"id": "a", "question": "q", "answer": {"value": 1}}, r"t.jsonl:1: field 'answer' must be a string or a number, got dict"),
    ({"id": "a", "question": "q", "answer": True}, r"t.jsonl:1: field 'answer' must be a string or a number, got bool"),
    ({"id": ["a"], "question": "q", "answer": "1"}, r"t.jsonl:1: field 'id' must be a string or a number, got list"),
    ({"id": "a", "question": "q", "answer": "1", "checker": 3}, r"t.jsonl:1: field 'checker' must be a string, got int"),
    ({"id": "a", "messages": [{"role": "user", "content": ["x"]}], "answer": "1"}, r"t.jsonl:1: field 'messages' must be"),
])
def test_task_fields_of_the_wrong_type_name_file_line_and_field(tmp_path, row, match):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps(row) + "\n")
    with pytest.raises(DriftError, match=match):
        load_tasks(TaskSpec(tasks=str(f)))


def test_numbers_stay_allowed_as_answers_and_ids(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"id": 7, "question": "6 x 7?", "answer": 42}) + "\n"
                 + json.dumps({"id": "h", "question": "half?", "answer": 0.5}) + "\n")
    assert [(p.id, p.answer) for p in load_tasks(TaskSpec(tasks=str(f)))] == [("7", "42"), ("h", "0.5")]


def test_task_file_with_bytes_that_are_not_utf8(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_bytes(b'{"id": "a", "question": "q", "answer": "1"}\n{"id": "b", "question": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(DriftError, match=r"t.jsonl:2: not UTF-8 text \(byte 0xe9 at column 29\)"):
        load_tasks(TaskSpec(tasks=str(f)))


def mul_problem():
    return load_tasks(TaskSpec(tasks="mul", num_problems=1, split="train"))[0]


def episode(p, cfg, sample_idx=0):
    runner = EnvRunner(cfg)
    return runner, Episode(p, sample_idx, runner.resets([p])[0], cfg.max_turns)


def say(runner, ep, response):
    ep.answer(response)
    return ep.apply(runner.steps([ep])[0])


def test_episode_feedback_then_success():
    p = mul_problem()
    runner, ep = episode(p, EnvConfig(max_turns=3))
    assert ep.messages[0] == {"role": "system", "content": "You're a helpful assistant."}
    assert ep.messages[1]["content"].endswith("Answer with just the number.")
    say(runner, ep, "I think 1")
    assert ep.messages[-1] == {"role": "user", "content": "Incorrect. Please think again."}
    say(runner, ep, "no idea")
    assert ep.trajectory.turns[1].status == "unparseable" and not ep.done
    say(runner, ep, f"It is {p.answer}.")
    t = ep.trajectory
    assert ep.done and t.success_turn == 3 and t.format_errors == 1
    assert [m["role"] for m in t.messages] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    row = t.to_json()
    assert all("reward" not in turn and "info" not in turn for turn in row["turns"])  # 0/1 rewards: the old rows
    assert Trajectory.from_json(json.loads(json.dumps(row))) == t


def test_episode_turn_limit_and_config():
    cfg = EnvConfig(max_turns=2, feedback="Try again.", system_prompt=None, instruction="Be brief.")
    runner, ep = episode(mul_problem(), cfg, 1)
    assert ep.messages[0]["role"] == "user" and ep.messages[0]["content"].endswith("Be brief.")
    say(runner, ep, "0")
    say(runner, ep, "0")
    assert ep.done and ep.trajectory.success_turn is None
    assert ep.messages[-1]["role"] == "assistant"  # no feedback after the last turn
    assert [m["content"] for m in ep.messages if m["role"] == "user"][1:] == ["Try again."]
    with pytest.raises(RuntimeError):
        ep.answer("1")
    with pytest.raises(DriftError, match="max_turns"):
        EnvConfig(max_turns=0)


def test_a_batch_of_steps_judged_together():
    p = mul_problem()
    cfg = EnvConfig(max_turns=2)
    runner = EnvRunner(cfg)
    episodes = [Episode(p, i, runner.resets([p])[0], cfg.max_turns) for i in range(3)]
    for ep, response in zip(episodes, ["no idea", "It is 0", f"It is {p.answer}"]):
        ep.answer(response)
    steps = runner.steps(episodes)
    assert [s.info["status"] for s in steps] == ["unparseable", "wrong", "correct"]
    assert [s.reward for s in steps] == [0.0, 0.0, 1.0]
    for ep, s in zip(episodes, steps):
        ep.apply(s)
    assert [ep.done for ep in episodes] == [False, False, True]
    assert [ep.trajectory.turns[0].status for ep in episodes] == ["unparseable", "wrong", "correct"]


def test_check_problems_names_the_problem_and_its_gold():
    ok = [Problem(id="m1", question="q", answer=r"\frac{1}{2}", checker="math"),
          Problem(id="n1", question="q", answer="12", checker="numeric")]
    EnvRunner(EnvConfig()).check_problems(ok)
    bad = ok + [Problem(id="m2", question="q", answer="#", checker="math")]
    with pytest.raises(DriftError, match=r"problem 'm2': math checker: math-verify cannot parse the gold answer '#'"):
        EnvRunner(EnvConfig()).check_problems(bad)
    with pytest.raises(DriftError, match="check_workers must be >= 1"):
        EnvConfig(check_workers=0)


@dataclass
class Inner:
    k: int = option(1, "k")


@dataclass
class Outer:
    name: str = option("x", "name")
    rate: float = option(0.1, "rate")
    flag: bool = option(False, "flag")
    maybe: int | None = option(None, "maybe")
    inner: Inner = option(None, "inner")


def test_config_build_types_and_errors():
    cfg = build(Outer, {"rate": 1, "flag": "true", "maybe": "none", "inner": {"k": "3"}})
    assert cfg.rate == 1.0 and cfg.flag is True and cfg.maybe is None and cfg.inner.k == 3
    with pytest.raises(DriftError, match="unknown config key 'inner.j'"):
        build(Outer, {"inner": {"j": 1}})
    with pytest.raises(DriftError, match="config key 'maybe' expects int or none, got 1.5"):
        build(Outer, {"maybe": 1.5})
    with pytest.raises(DriftError, match="config key 'flag' expects bool"):
        build(Outer, {"flag": "maybe"})
    assert apply_overrides({"inner": {"k": 1}}, ["inner.k=2", "name=abc"]) == {"inner": {"k": 2}, "name": "abc"}


def test_hf_tasks_without_datasets_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(DriftError, match=r"^tasks 'hf:openai/gsm8k:main@test': hf: tasks need the datasets "
                                         r"package: pip install 'drift-rl\[hub\]'$"):
        load_tasks(TaskSpec(tasks="hf:openai/gsm8k:main@test"))


def test_episode_without_oracle_goes_on_after_a_right_answer():
    p = mul_problem()
    cfg = EnvConfig(max_turns=3, oracle=False, feedback="Please check your answer and answer again.")
    runner = EnvRunner(cfg)
    ep = Episode(p, 0, runner.resets([p])[0], cfg.max_turns, cfg.oracle)
    say(runner, ep, f"It is {p.answer}.")
    assert not ep.done and ep.messages[-1] == {"role": "user", "content": "Please check your answer and answer again."}
    say(runner, ep, "It is 0.")
    say(runner, ep, f"{p.answer}")
    t = ep.trajectory
    assert ep.done and t.success_turn == 1  # the first correct turn, though turn 2 was wrong
    assert [turn.status for turn in t.turns] == ["correct", "wrong", "correct"]


def test_episode_with_a_planted_answer_starts_after_it():
    p = dataclasses.replace(mul_problem(), planted="I think it is 1.")
    runner, ep = episode(p, EnvConfig(max_turns=3))
    runner.plant([ep])
    t = ep.trajectory
    assert t.metadata == {"planted": True} and not ep.done
    assert t.turns[0].response == "I think it is 1." and t.turns[0].status == "wrong" and t.turns[0].tokens == 0
    assert [m["role"] for m in t.messages] == ["system", "user", "assistant", "user"]
    assert t.messages[2:] == [{"role": "assistant", "content": "I think it is 1."},
                              {"role": "user", "content": "Incorrect. Please think again."}]
    say(runner, ep, p.answer)
    assert ep.done and t.success_turn == 2
    with pytest.raises(DriftError, match="planted answer ends the conversation"):
        right, = [dataclasses.replace(p, planted=p.answer)]
        runner.plant([episode(right, EnvConfig(max_turns=3))[1]])
    with pytest.raises(DriftError, match="planted answer ends the conversation"):
        runner.plant([episode(p, EnvConfig(max_turns=1))[1]])


def test_a_key_added_later_is_recorded_only_when_changed():
    from drift.config import settings

    @dataclass
    class Stage:
        a: int = option(1, "an old key")
        b: bool = option(True, "a key added later", result="changed")

    assert settings(Stage()) == {"a": 1}  # a record written before b existed still matches
    assert settings(Stage(b=False)) == {"a": 1, "b": False}
    assert "oracle" not in settings(EnvConfig()) and settings(EnvConfig(oracle=False))["oracle"] is False
