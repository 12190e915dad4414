"""DeepSpeed ZeRO-2 and ZeRO-3 and FSDP through `accelerate launch` on two CPU processes (gloo).

Each engine runs the repository's own accelerate config (configs/accelerate/zero2.yaml, zero3.yaml,
fsdp.yaml) with `--num_processes 2`. The ZeRO runs must train exactly like one process on the same
global batch (losses to 1e-5, gradient norms to 1e-4, parameters to 1e-5; measured: 2.4e-6 for
ZeRO-2, 1.3e-6 for ZeRO-3), save a model that transformers loads, and resume from their own
checkpoint to the same final weights. FSDP does not run on a CPU under accelerate 1.16 (it keeps
MULTI_CPU and would train unsharded), and the online arm does not run under DeepSpeed (its
`Accelerator(cpu=True)` ignores the config): the tests show drift stopping with its one line
before anything is written, where it would otherwise train unsharded without a word.

DeepSpeed is not in the test venv (`make test`); CI runs this module in the engines venv
(`make engines-test`, .ci/run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_accelerate import free_port, params, write_rows

from drift.config import build
from drift.train.trainer import TrainConfig, run_train

pytest.importorskip("deepspeed", reason="DeepSpeed runs in the engines venv (make engines-test)")

ROOT = Path(__file__).resolve().parents[1]
COMMON = dict(lr=1e-3, epochs=1, warmup_ratio=0, weight_decay=0, logging_steps=1, min_weight=0, max_steps=3,
              turns="all", normalize="weight_sum", dtype="float32")


def launch(engine: str, flags: dict, output: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / f"configs/accelerate/{engine}.yaml"), "--num_processes", "2", "--main_process_port",
           str(free_port()), "-m", "drift.cli", "train", *[f"--{k.replace('_', '-')}={v}" for k, v in flags.items()],
           f"--output={output}", "--batch-size=1", "--grad-accum=2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    # the DeepSpeed configs name their JSON relative to the repository root
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("one")
    data = write_rows(tmp / "w.jsonl", 14)
    flags = {**COMMON, "model": str(tiny_model_dir), "data": data}
    summary = run_train(build(TrainConfig, {**flags, "save_steps": 0, "output": str(tmp / "out"), "batch_size": 4}))
    return flags, summary, params(tmp / "out")


@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_deepspeed_on_two_cpu_processes_matches_one_and_resumes(tmp_path, one_process, engine):
    flags, single, single_params = one_process
    whole = launch(engine, {**flags, "save_steps": 2}, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    summary = json.loads((tmp_path / "whole" / "train_summary.json").read_text())
    assert summary["distributed_type"] == "DEEPSPEED" and summary["world_size"] == 2
    assert len(summary["history"]) == len(single["history"]) == 3
    for h2, h1 in zip(summary["history"], single["history"]):
        assert h2["loss"] == pytest.approx(h1["loss"], rel=1e-5)
        assert h2["grad_norm"] == pytest.approx(h1["grad_norm"], rel=1e-4)
    assert summary["trained_tokens"] == single["trained_tokens"]
    final = params(tmp_path / "whole")  # the saved model loads in transformers
    assert torch.allclose(final, single_params, atol=1e-5)

    checkpoint = tmp_path / "whole" / "checkpoint-2"
    assert (checkpoint / "drift_checkpoint.json").is_file()
    resumed = launch(engine, {**flags, "save_steps": 2, "resume_from_checkpoint": checkpoint}, tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = json.loads((tmp_path / "resumed" / "train_summary.json").read_text())
    assert again["resumed_from"] == str(checkpoint) and again["steps"] == 3
    assert torch.allclose(params(tmp_path / "resumed"), final, atol=1e-6)


def test_fsdp_on_a_cpu_stops_with_one_line(tmp_path, one_process):
    flags, _, _ = one_process
    proc = launch("fsdp", {**flags, "save_steps": 0}, tmp_path / "fsdp")
    assert proc.returncode != 0
    assert ("drift train: error: the accelerate config asks for FSDP, but drift train set up MULTI_CPU on cpu: "
            "accelerate runs FSDP on GPUs only" in proc.stderr), proc.stderr[-3000:]
    assert not (tmp_path / "fsdp" / "train_summary.json").exists()  # stopped before anything was written


def test_the_online_arm_under_deepspeed_stops_with_one_line(tmp_path, tiny_model_dir):
    from online_task import write_tasks

    tasks = write_tasks(tmp_path / "tasks.jsonl", 4)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate/zero2.yaml"),
           "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "drift.cli", "online",
           f"--model={tiny_model_dir}", f"--tasks={tasks}", f"--output={tmp_path / 'online'}", "--n=4",
           "--batch-prompts=2", "--max-turns=2", "--max-new-tokens=3", "--iterations=1", "--dtype=float32"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert ("drift online: error: the accelerate config asks for DEEPSPEED, but the online arm set up MULTI_CPU on "
            "cpu: the online arm does not run under DeepSpeed" in proc.stderr), proc.stderr[-3000:]
    assert not (tmp_path / "online" / "train_summary.json").exists()
