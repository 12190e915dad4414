"""drift's hf backend, drift's vllm backend and a bare vllm.LLM.chat loop on one multi-turn workload.

The workload is the demo's rollout (mul, train split, n = 8, 3 turns of "Incorrect. Please think
again.", temperature 1, 48 new tokens, `--dtype`: auto is bf16 where the CPU computes it fast, else
fp32) on `--problems` of its 49 facts. Each side runs in
this one process, one after another; the bare loop reuses the vllm side's engine (so start-up is
counted once, for the vllm side). CPU seconds are this process's plus every child's (vLLM's engine
core and worker processes, the hf backend's sampling workers), so they count what vLLM spends
outside the caller too. Run in the engines venv (docs/benchmarks.md, "vLLM on a CPU"):

    VLLM_CPU_KVCACHE_SPACE=2 .venv-engines/bin/python benchmarks/vllm_vs_hf.py --problems 16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

import psutil

from drift.config import build
from drift.env import Episode
from drift.envs.runner import EnvRunner
from drift.rollout import RolloutConfig, run_rollout
from drift.rollout.config import env_config, task_spec
from drift.rollout.protocol import sample_seed
from drift.rollout.vllm_backend import VLLMBackend
from drift.tasks import load_tasks


def cpu_seconds() -> float:
    """This process, its reaped children, and its live descendants (user + system)."""
    own = time.process_time()
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    live = sum(sum(p.cpu_times()[:2]) for p in psutil.Process().children(recursive=True) if p.is_running())
    return own + reaped.ru_utime + reaped.ru_stime + live


def measured(fn):
    t0, c0 = time.monotonic(), cpu_seconds()
    tokens = fn()
    wall, cpu = time.monotonic() - t0, cpu_seconds() - c0
    return {"generated_tokens": tokens, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "tok_per_s": round(tokens / wall, 1), "tok_per_cpu_s": round(tokens / cpu, 1)}


def bare_loop(backend: VLLMBackend, cfg: RolloutConfig) -> int:
    """The same conversations through vllm.LLM.chat directly: one call per turn for every live one."""
    import vllm

    env = env_config(cfg)
    runner, problems = EnvRunner(env), load_tasks(task_spec(cfg))
    live = [Episode(p, i, opening, env.max_turns) for p, opening in zip(problems, runner.resets(problems))
            for i in range(cfg.n)]
    tokens = 0
    while live:
        turn = len(live[0].trajectory.turns) + 1
        params = [vllm.SamplingParams(n=1, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                                      seed=sample_seed(cfg.seed, ep.trajectory.key, turn)) for ep in live]
        outs = backend.llm.chat([ep.messages for ep in live], params, use_tqdm=False)
        for ep, o in zip(live, outs):
            ep.answer(o.outputs[0].text)
        for ep, o, step in zip(live, outs, runner.steps(live)):
            c = o.outputs[0]
            tokens += len(c.token_ids)
            ep.apply(step, len(c.token_ids), "length" if c.finish_reason == "length" else "stop")
        live = [ep for ep in live if not ep.done]
    return tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=16, help="facts of the demo's 49 (train split)")
    ap.add_argument("--hf-workers", type=int, default=2, help="the demo's [rollout] workers")
    ap.add_argument("--eager", action="store_true", help="vLLM without compilation")
    ap.add_argument("--dtype", default="auto", help="auto: bf16 where the CPU computes it fast, else fp32")
    args = ap.parse_args()
    load_at_start = os.getloadavg()
    tmp = tempfile.mkdtemp(prefix="vllm-vs-hf-")
    base = dict(tasks="mul", split="train", num_problems=args.problems, n=8, max_turns=3, temperature=1.0, top_p=1.0,
                max_new_tokens=48, seed=0, dtype=args.dtype)
    rows = {}
    hf = build(RolloutConfig, {**base, "backend": "hf", "batch_size": 32, "workers": args.hf_workers,
                               "output": f"{tmp}/hf"})
    rows["drift hf backend"] = measured(lambda: run_rollout(hf)["summary"]["total_tokens"])

    t0 = time.monotonic()
    extra = {"enforce_eager": True} if args.eager else {}
    vcfg = build(RolloutConfig, {**base, "backend": "vllm", "output": f"{tmp}/vllm", "vllm_args": extra})
    from drift.models import resolve_model

    backend = VLLMBackend(resolve_model("smollm2-135m"), seed=0, dtype=args.dtype, extra=extra)
    startup = round(time.monotonic() - t0, 1)
    rows["drift vllm backend"] = measured(lambda: run_rollout(vcfg, backend=backend)["summary"]["total_tokens"])
    rows["bare vllm.LLM.chat loop"] = measured(lambda: bare_loop(backend, vcfg))
    cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    print(json.dumps({"cpu": cpu, "dtype": backend.hardware["dtype"], "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg(),
                      "vllm_startup_s": startup, "eager": args.eager, "problems": args.problems, "sides": rows},
                     indent=1))


if __name__ == "__main__":
    main()
