"""Where training's CPU time goes: torch.profiler over a few optimizer steps of the real `run_train`.

Each dtype runs in its own process, one after the other, on the same rows and steps; the table
gives each operation group's share of self CPU time and its milliseconds per step, so the two
dtypes can be read side by side (a ratio from one run; absolute times move with the machine's
load). Groups: matmuls (mm, addmm, bmm, linear's backward), the attention kernel forward and
backward, dtype casts (copy_, to: autocast's weight casts and the gradients' way back), the
optimizer step (AdamW), the gradient norm and clipping, and the rest.

    python benchmarks/train_profile.py --data runs/demo/weights/drift.jsonl --steps 6 --dtypes auto,float32
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
import transformers

from drift.config import build
from drift.train.trainer import TrainConfig, run_train

GROUPS = (  # (group, substrings of the profiler's operation names), first match wins
    ("attention backward", ("flash_attention_for_cpu_backward", "_efficient_attention_backward", "attention_backward")),
    ("attention forward", ("scaled_dot_product", "flash_attention_for_cpu")),
    ("optimizer step (AdamW)", ("adamw", "_fused_adam", "optimizer.step")),
    ("gradient norm and clipping", ("linalg_vector_norm", "clip_grad", "_foreach_norm", "foreach_mul")),
    ("matmuls", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul")),
    ("dtype casts (copy_, to)", ("aten::copy_", "aten::_to_copy")),
)


def group_of(name: str) -> str:
    low = name.lower()
    return next((g for g, keys in GROUPS if any(k.lower() in low for k in keys)), "other")


def run_one(args: argparse.Namespace) -> None:
    """Child process: profile `--steps` steps in `--dtype`, print the groups' self CPU ms as JSON."""
    torch.set_num_threads(args.threads)
    train = transformers.Trainer.train
    shares: Counter = Counter()

    def profiled(self, *a, **kw):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = train(self, *a, **kw)
        for e in prof.key_averages():
            shares[group_of(e.key)] += e.self_cpu_time_total / 1000.0
        return out

    transformers.Trainer.train = profiled
    s = run_train(build(TrainConfig, dict(model=args.model, data=args.data, output=str(Path(args.work) / args.dtype),
                                          dtype=args.dtype, max_steps=args.steps, batch_size=args.batch_size,
                                          logging_steps=1, save_steps=0, attn_implementation=args.attn)))
    print(json.dumps({"dtype": s["hardware"]["dtype"], "steps": s["steps"], "tokens": s["tokens"],
                      "padding_share": s["padding_share"], "seconds": s["seconds"], "ms": dict(shares)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", required=True, help="weighted JSONL (`drift weights`)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtypes", default="auto,float32")
    p.add_argument("--attn", default=None, help="attn_implementation (default: transformers' own)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", help=argparse.SUPPRESS)  # internal: profile this dtype in this process
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.dtype:
        return run_one(args)
    work = tempfile.mkdtemp(prefix="drift-train-profile-")
    results = []
    for dtype in args.dtypes.split(","):
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--dtype", dtype, "--work", work],
                               check=True, stdout=subprocess.PIPE, text=True)
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    names = [g for g, _ in GROUPS] + ["other"]
    print(f"{results[0]['steps']} steps of batch {args.batch_size}, {results[0]['tokens']:,} tokens, padding "
          f"{100 * results[0]['padding_share']:.1f}%, {args.threads} thread(s)\n")
    print("| group | " + " | ".join(f"{r['dtype']} ms/step | share" for r in results) + " |")
    print("|---|" + "---:|---:|" * len(results))
    for g in names:
        cells = []
        for r in results:
            total = sum(r["ms"].values())
            cells += [f"{r['ms'].get(g, 0.0) / r['steps']:.0f}", f"{100 * r['ms'].get(g, 0.0) / total:.1f}%"]
        print(f"| {g} | " + " | ".join(cells) + " |")
    print("| training loop, wall s | " + " | ".join(f"{r['seconds']:.1f} | " for r in results) + "|")


if __name__ == "__main__":
    main()
