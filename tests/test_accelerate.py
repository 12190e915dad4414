"""The multi-process path: `accelerate launch` with two CPU processes (gloo) trains exactly like
one process on the same global batch."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from drift.config import build
from drift.train.trainer import TrainConfig, run_train

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_rows(path: Path, n: int) -> str:
    rng = random.Random(7)
    with path.open("w") as f:
        for i in range(n):
            msgs = [{"role": "user", "content": f"What is {i} * 3?" + " hm" * rng.randint(0, 8)}]
            for _ in range(rng.randint(1, 3)):
                answer = f"<answer>{rng.randint(0, 50)}</answer>" + "." * rng.randint(0, 20)
                msgs += [{"role": "assistant", "content": answer},
                         {"role": "user", "content": "Incorrect. Please think again."}]
            f.write(json.dumps({"messages": msgs[:-1], "weight": rng.choice([0.1, 1.0, 2.5])}) + "\n")
    return str(path)


def params(out: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("normalize", ["weight_sum", "mean", "constant"])
def test_two_processes_match_one(tmp_path, tiny_model_dir, normalize):
    data = write_rows(tmp_path / "w.jsonl", 14)
    common = dict(model=str(tiny_model_dir), data=data, lr=1e-3, epochs=1, warmup_ratio=0, weight_decay=0,
                  logging_steps=1, save_steps=0, min_weight=0, max_steps=3, turns="all", normalize=normalize,
                  dtype="float32")  # a subprocess sees the real CPU: fp32 explicitly, for exact invariance
    single = run_train(build(TrainConfig, {**common, "output": str(tmp_path / "one"), "batch_size": 4}))

    flags = [f"--{k.replace('_', '-')}={v}" for k, v in common.items()]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate/cpu_2proc.yaml"), "--main_process_port", str(free_port()),
           "-m", "drift.cli", "train", *flags, f"--output={tmp_path / 'two'}", "--batch-size=1", "--grad-accum=2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    double = json.loads((tmp_path / "two" / "train_summary.json").read_text())

    assert double["world_size"] == 2 and single["world_size"] == 1
    assert double["distributed_type"] == "MULTI_CPU" and single["distributed_type"] == "NO"
    assert len(double["history"]) == len(single["history"]) == 3
    for h2, h1 in zip(double["history"], single["history"]):
        assert h2["loss"] == pytest.approx(h1["loss"], rel=1e-5)
        assert h2["grad_norm"] == pytest.approx(h1["grad_norm"], rel=1e-4)
    assert double["trained_tokens"] == single["trained_tokens"]
    assert torch.allclose(params(tmp_path / "two"), params(tmp_path / "one"), atol=1e-5)
