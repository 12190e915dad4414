"""The Ray executor's cost: the same rollout with local `workers = 2` and on 2 Ray actors.

Both sides run the real stage (`run_rollout`) on the same problems, seed and settings; the Ray side
joins a local Ray instance started once for the benchmark (its start-up is reported apart, as it
is paid once per `drift` process, not per stage). Sides alternate (local, ray, local, ray, ...)
so that a shared machine's load falls on both alike. Per run it reports:
- stage seconds: the whole `run_rollout` call (worker processes or actors started, the model
  loaded in each, sampling, the closing checks);
- sampling tok/s: the manifest session's generated tokens per second (from the first prompt
  group sent to the last trajectory written, start-up excluded);
- start-up seconds: stage seconds minus the session's sampling seconds.

    python benchmarks/ray_bench.py --prompts 32 --repeats 2 --json ray_bench.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import ray

from drift.rollout.engine import RolloutConfig, run_rollout


def one(side: str, out: Path, args: argparse.Namespace) -> dict:
    common = dict(model=args.model, tasks="mul", split="train", num_problems=args.prompts, n=8, max_turns=3,
                  max_new_tokens=48, batch_size=32, seed=0, threads=1)
    extra = dict(workers=2) if side == "local" else dict(executor="ray", num_actors=2, num_cpus=1)
    t0 = time.perf_counter()
    manifest = run_rollout(RolloutConfig(output=str(out), **common, **extra))
    stage = time.perf_counter() - t0
    session = manifest["timings"]["sessions"][-1]
    return {"side": side, "stage_seconds": round(stage, 1), "sampling_seconds": session["wall_seconds"],
            "generated_tokens": session["generated_tokens"], "sampling_tok_s": session["tokens_per_second"],
            "stage_tok_s": round(session["generated_tokens"] / stage, 1),
            "startup_seconds": round(stage - session["wall_seconds"], 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray_start = round(time.perf_counter() - t0, 1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for side in ("local", "ray"):
                rows.append(one(side, Path(tmp) / f"{side}-{r}", args))
                print(json.dumps(rows[-1]), flush=True)
    ray.shutdown()
    summary = {"ray_init_seconds": ray_start, "runs": rows}
    for side in ("local", "ray"):
        mine = [x for x in rows if x["side"] == side]
        summary[side] = {k: round(sum(x[k] for x in mine) / len(mine), 1)
                         for k in ("stage_seconds", "sampling_tok_s", "stage_tok_s", "startup_seconds")}
    summary["ray_over_local_stage"] = round(summary["ray"]["stage_seconds"] / summary["local"]["stage_seconds"], 3)
    summary["local_over_ray_sampling_tok_s"] = round(summary["local"]["sampling_tok_s"] / summary["ray"]["sampling_tok_s"], 3)
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
