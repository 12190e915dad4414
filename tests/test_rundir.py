"""Stage records: the literal record a stage writes today, so that how it is built can change but
what lands on disk (and every digest a later stage compares) cannot."""

from __future__ import annotations

import json
from dataclasses import dataclass

from drift.config import option
from drift.rollout.config import RolloutConfig
from drift.rollout.engine import stage_record
from drift.rundir import config_record, record
from drift.tasks import Problem

PROBLEMS = [Problem(id="p0", question="What is 1 + 7?", answer="8", checker="numeric", extract="number")]


def test_rollout_record_is_unchanged():
    cfg = RolloutConfig(output="/tmp/x", tasks="mc-arith", num_problems=1, dtype="float32")
    # the environment's identity (env, env_args, env_failures; env_factory, env_version) since environments became
    # plug-ins; every other key as before
    settings = ('{"env": "try-again", "env_args": {}, "env_failures": "stop", "max_turns": 5, "feedback": "Incorrect. Please think again.", "system_prompt": "You\'re a helpful '
                'assistant.", "instruction": null, "check_timeout": 5.0, "tasks": "mc-arith", "num_problems": 1, '
                '"task_seed": 0, "split": "all", "checker": null, "model": "smollm2-135m", "backend": "hf", "n": 8, '
                '"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 256, "seed": 0, "dtype": "float32", '
                '"adapter": null, "max_model_len": null, "extra_body": {}, "env_factory": "drift.envs.try_again:TryAgain", '
                '"env_version": "1", "problems": "6fc6c54bf10c660c"}')
    assert json.dumps(stage_record(cfg, PROBLEMS, None)) == (
        '{"stage": "rollout", "status": "running", "schema_version": 1, "settings": ' + settings
        + ', "input": null, "digest": "fe31203810eee435"}')
    trained = stage_record(cfg, PROBLEMS, {"digest": "abc"})
    assert json.dumps(trained) == (
        '{"stage": "rollout", "status": "running", "schema_version": 1, "settings": '
        + settings.replace('"model": "smollm2-135m"', '"model": "trained:abc"')
        + ', "input": {"path": "smollm2-135m", "digest": "abc"}, "digest": "e01b99845ce080d9"}')


@dataclass
class Small:
    model: str = option("m", "a model")
    dtype: str = option("auto", "a dtype")
    threads: int = option(2, "does not shape the output", result=False)


def test_config_record_is_the_records_written_by_hand_before_it():
    """The helper against the recipe it replaced (`record` over `with_model` over settings), and literally."""
    assert config_record("weights", Small(), None, None) == record("weights", {"model": "m", "dtype": "auto"})
    trained = config_record("train", Small(), {"digest": "in"}, "data.jsonl", model_record={"digest": "abc"},
                            dtype="float32", problems="ff")
    assert json.dumps(trained) == (
        '{"stage": "train", "status": "running", "schema_version": 1, "settings": {"model": "trained:abc", '
        '"dtype": "float32", "problems": "ff"}, "input": {"path": "data.jsonl", "digest": "in"}, '
        '"digest": "baee4f343792a7f5"}')
