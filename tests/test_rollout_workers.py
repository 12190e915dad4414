"""The hf backend on several processes (`workers > 1`): the same trajectories as one process in
fp32, the workers' cost in the ledger, refused histories, a worker's failure raised."""

import json
from pathlib import Path

import pytest

from drift import DriftError
from drift.records import read_trajectories
from drift.rollout import RolloutConfig, run_rollout
from drift.rollout.protocol import GenRequest, PromptTooLong, SamplingParams


def rollout(tmp_path, model, name, **kw):
    cfg = RolloutConfig(model=str(model), output=str(tmp_path / name), tasks="arith", num_problems=6, n=3,
                        max_turns=3, max_new_tokens=6, batch_size=4, dtype="float32", threads=1, seed=3, **kw)
    manifest = run_rollout(cfg)
    trajs = sorted(read_trajectories(Path(cfg.output) / "trajectories"), key=lambda t: t.key)
    return manifest, [json.dumps(t.to_json(), sort_keys=True) for t in trajs]


@pytest.mark.parametrize("stream_turns", [True, False])
def test_two_workers_sample_what_one_process_samples(tmp_path, tiny_model_dir, stream_turns):
    one, alone = rollout(tmp_path, tiny_model_dir, "one", stream_turns=stream_turns)
    two, side_by_side = rollout(tmp_path, tiny_model_dir, "two", stream_turns=stream_turns, workers=2)
    assert side_by_side == alone and len(alone) == 18
    assert two["summary"] == one["summary"] and two["hardware"] == one["hardware"]
    c1, c2 = one["cost"], two["cost"]
    assert c2["generated_tokens"] == c1["generated_tokens"] and c2["prefill_tokens"] == c1["prefill_tokens"]
    assert c2["flops"] == c1["flops"]
    # the workers loaded the model and sampled: their CPU time and memory are the stage's too
    assert c2["cpu_seconds"] > c2["wall_seconds"] * 0.5 and c2["peak_memory_bytes"] > c1["peak_memory_bytes"]


def test_workers_refuse_too_long_histories_before_sending_them(tiny_model_dir):
    from drift.rollout.workers import HFWorkers

    pool = HFWorkers(str(tiny_model_dir), 2, batch_size=2, dtype="float32", threads=1)
    try:
        long = GenRequest([("p", 0)], [{"role": "user", "content": "word " * 2000}], 1)
        ok = GenRequest([("q", 0), ("q", 1)], [{"role": "user", "content": "1+1?"}], 1)
        stream = pool.stream(SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=3, seed=0))
        with pytest.raises(PromptTooLong) as e:
            stream.submit([ok, long])
        assert e.value.conv_ids == [("p", 0)] and not any(pool.in_flight)  # nothing was sent
        stream.submit([ok])
        answers = []
        while more := stream.poll():
            answers += more
        assert sorted(c for c, _ in answers) == [("q", 0), ("q", 1)]
        assert pool.stats.generated_tokens == sum(o.tokens for _, o in answers)
    finally:
        pool.close()


def test_workers_are_for_cpus(tiny_model_dir):
    from drift.rollout.workers import HFWorkers

    with pytest.raises(DriftError, match="for CPUs"):
        HFWorkers(str(tiny_model_dir), 2, device="cuda")


def test_the_online_arm_refuses_workers_and_a_run_does_not_hand_them_on(tmp_path, tiny_model_dir):
    from drift.config import build
    from drift.online.config import OnlineConfig
    from drift.pipeline import RunConfig
    from test_pipeline import config

    with pytest.raises(DriftError, match="'workers' applies to rollout and eval"):
        OnlineConfig(model=str(tiny_model_dir), output=str(tmp_path / "o"), workers=2)
    data = config(tmp_path, tiny_model_dir, arms={"online": {"method": "online", "online": {"batch_prompts": 2}}})
    cfg = build(RunConfig, {**data, "rollout": {**data["rollout"], "workers": 2}})
    assert cfg.rollout_config().workers == 2 and cfg.kinds["online"].online_config(cfg).workers == 1
