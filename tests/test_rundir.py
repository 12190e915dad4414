"""Stage records: the literal record a stage writes today, so that how it is built can change but
what lands on disk (and every digest a later stage compares) cannot."""

from __future__ import annotations

import json

from drift.rollout.engine import RolloutConfig, stage_record
from drift.tasks import Problem

PROBLEMS = [Problem(id="p0", question="What is 1 + 7?", answer="8", checker="numeric", extract="number")]


def test_rollout_record_is_unchanged():
    cfg = RolloutConfig(output="/tmp/x", tasks="mc-arith", num_problems=1, dtype="float32")
    settings = ('{"max_turns": 5, "feedback": "Incorrect. Please think again.", "system_prompt": "You\'re a helpful '
                'assistant.", "instruction": null, "check_timeout": 5.0, "tasks": "mc-arith", "num_problems": 1, '
                '"task_seed": 0, "split": "all", "checker": null, "model": "smollm2-135m", "backend": "hf", "n": 8, '
                '"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 256, "seed": 0, "dtype": "float32", '
                '"adapter": null, "max_model_len": null, "extra_body": {}, "problems": "6fc6c54bf10c660c"}')
    assert json.dumps(stage_record(cfg, PROBLEMS, None)) == (
        '{"stage": "rollout", "status": "running", "schema_version": 1, "settings": ' + settings
        + ', "input": null, "digest": "21ac6e8b930da701"}')
    trained = stage_record(cfg, PROBLEMS, {"digest": "abc"})
    assert json.dumps(trained) == (
        '{"stage": "rollout", "status": "running", "schema_version": 1, "settings": '
        + settings.replace('"model": "smollm2-135m"', '"model": "trained:abc"')
        + ', "input": {"path": "smollm2-135m", "digest": "abc"}, "digest": "3dc36e8090ddae77"}')
