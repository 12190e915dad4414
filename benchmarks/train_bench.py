"""Training throughput: drift's batching against the naive recipe on the same data.

The naive recipe is one example per row, padded to the longest row of a random batch
(`batching=random`). drift groups rows of similar length into micro-batches (`group`, the
default) or packs them padding-free with per-sequence position ids (`pack`). Every recipe runs
one epoch over the same rows with the same global batch, through the real `run_train`, so they
do identical useful work; the report gives non-padding and trained tokens per second, padding
waste, and the speed-up over the naive recipe.

    python benchmarks/train_bench.py                      # SmolLM2-135M, synthetic try-again data
    python benchmarks/train_bench.py --data weighted.jsonl --model /path/to/model
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from drift.config import build
from drift.train.trainer import TrainConfig, run_train

WORDS = ("the answer is so we get then check again value step total first next term sum product "
         "because therefore since compute gives equals wrong right result problem number").split()


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    """Try-again conversations shaped like rollouts: 1-5 assistant turns (most solve early), each
    answer 20-400 words (log-uniform), and the fixed feedback message between turns."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        msgs = [{"role": "system", "content": "You're a helpful assistant."},
                {"role": "user", "content": f"Problem {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(20, 80)))
                 + "\nPut the final answer in <answer></answer>."}]
        turns = min(5, 1 + int(rng.expovariate(0.7)))
        for t in range(turns):
            words = int(round(20 * 20 ** rng.random()))  # 20..400, log-uniform
            msgs.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=words))
                         + f" <answer>{rng.randint(0, 999)}</answer>"})
            if t < turns - 1:
                msgs.append({"role": "user", "content": "Incorrect. Please think again."})
        rows.append({"prompt_id": str(i), "messages": msgs, "weight": 1.0})
    return rows


def run(args: argparse.Namespace) -> list[dict]:
    work = Path(args.work or tempfile.mkdtemp(prefix="drift-train-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = args.data
    if data is None:
        data = str(work / "synthetic.jsonl")
        Path(data).write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(args.rows, args.seed)))
    results = []
    for recipe in args.recipes.split(","):
        cfg = build(TrainConfig, dict(
            model=args.model, data=data, output=str(work / recipe), batching=recipe, turns=args.turns,
            batch_size=args.batch_size, grad_accum=1, epochs=1, max_length=args.max_length, lr=1e-5,
            warmup_ratio=0, logging_steps=1000, save_steps=0, min_weight=0, seed=args.seed))
        cpu = time.process_time()
        s = run_train(cfg)
        cpu = time.process_time() - cpu  # this process's CPU time (model load included): steadier on a shared machine
        results.append({"recipe": recipe, "steps": s["steps"], "seconds": s["seconds"], "cpu_seconds": cpu,
                        "tokens": s["tokens"],
                        "trained_tokens": s["trained_tokens"], "padding_share": s["padding_share"],
                        "tokens_per_second": s["tokens_per_second"],
                        "trained_tokens_per_second": s["trained_tokens_per_second"]})
    base = next((r for r in results if r["recipe"] == "random"), results[0])
    for r in results:
        r["speedup_vs_naive"] = r["tokens_per_second"] / base["tokens_per_second"]
        r["cpu_speedup_vs_naive"] = (r["tokens"] / r["cpu_seconds"]) / (base["tokens"] / base["cpu_seconds"])
    return results


def table(results: list[dict]) -> str:
    lines = ["| recipe | steps | wall s | CPU s | tokens/s (non-padding) | trained tokens/s | padding waste "
             "| speed-up (wall) | speed-up (CPU time) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        name = "naive (random, padded)" if r["recipe"] == "random" else r["recipe"]
        lines.append(f"| {name} | {r['steps']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | "
                     f"{r['tokens_per_second']:.1f} | {r['trained_tokens_per_second']:.1f} | "
                     f"{100 * r['padding_share']:.1f}% | {r['speedup_vs_naive']:.2f}x | "
                     f"{r['cpu_speedup_vs_naive']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", help="weighted JSONL to use instead of synthetic conversations")
    p.add_argument("--rows", type=int, default=48, help="synthetic conversations")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--turns", default="all", choices=["last", "all"])
    p.add_argument("--recipes", default="random,group,pack", help="comma-separated batching modes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads; 1 makes CPU time a steady measure on a shared "
                   "machine (no threads spinning while they wait for each other)")
    p.add_argument("--work", help="directory for data and outputs (default: a temporary one)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
