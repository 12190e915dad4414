"""What an arm's training costs, counted without training: the weights stage and the trainer's own
data path (`load_examples`, `GlobalBatchSampler`, `collate`) on a finished rollout, with no model.

For each arm it prints the rows trained, pruned and dropped, the optimizer steps, the tokens
through forward and backward (what the ledger's `trained_tokens` counts: the real tokens of
every micro-batch of every epoch, the one padding token of an all-pruned micro-batch included)
and the training FLOPs (6N per such token). These counts do not depend on the machine or its
load; a training run of the same arm records the same numbers in its ledger.

    python benchmarks/train_cost.py runs/prune-s0/rollout \
        --arms '{"rft": {"method": "rft"}, "drift": {"method": "drift", "prune": 0.001}}'
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from drift.config import build
from drift.models import load_tokenizer, resolve_model
from drift.records import write_jsonl
from drift.train.data import GlobalBatchSampler, collate, load_examples
from drift.weights import WeightsConfig, compute

PARAMETERS = 134_515_008  # SmolLM2-135M-Instruct (the ledger's N)


def arm_cost(rollout: str, spec: dict, tokenizer, work: Path, epochs: int, batch_size: int) -> dict:
    spec = dict(spec)
    min_weight = spec.pop("min_weight", 1e-3)
    cfg = build(WeightsConfig, {"beta": 0.1, "gamma": 0.9, **spec, "input": rollout, "output": str(work / "w.jsonl")})
    rows, diag = compute(cfg)
    write_jsonl(work / "w.jsonl", (r.to_json() for r in rows))
    examples, stats = load_examples(work / "w.jsonl", tokenizer, "last", 1024, min_weight)
    sampler = GlobalBatchSampler([len(e.input_ids) for e in examples], batch_size, order="group", seed=0)
    tokens = steps = empty = 0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for micro in sampler:
            batch = collate([examples[i] for i in micro], tokenizer.pad_token_id)
            tokens += int(batch["attention_mask"].sum())
            empty += all(examples[i].pruned for i in micro)
            steps += 1
    return {"rows_trained": stats.rows_used, "rows_pruned": stats.pruned, "rows_dropped": stats.dropped_min_weight,
            "unsolved_groups": diag["unsolved_groups"], "steps": steps, "all_pruned_steps": empty, "tokens": tokens,
            "flops": 6.0 * PARAMETERS * tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rollouts", nargs="+", help="finished rollout directories")
    p.add_argument("--arms", required=True, help="JSON: arm -> weights keys (method, prune, degenerate, ...) "
                                                 "and min_weight")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()
    tokenizer = load_tokenizer(resolve_model("smollm2-135m"))
    arms = json.loads(args.arms)
    print("| rollout | arm | rows trained | pruned | dropped (min_weight) | unsolved groups | optimizer steps "
          "| all-pruned steps | tokens | training FLOPs | tokens / first arm's |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rollout in args.rollouts:
        first = None
        for name, spec in arms.items():
            with tempfile.TemporaryDirectory() as work:
                c = arm_cost(rollout, spec, tokenizer, Path(work), args.epochs, args.batch_size)
            first = first or c["tokens"]
            print(f"| {rollout} | {name} | {c['rows_trained']} | {c['rows_pruned']} | {c['rows_dropped']} | "
                  f"{c['unsolved_groups']} | {c['steps']} | {c['all_pruned_steps']} | {c['tokens']:,} | "
                  f"{c['flops']:.3g} | {c['tokens'] / first:.2f} |", flush=True)


if __name__ == "__main__":
    main()
