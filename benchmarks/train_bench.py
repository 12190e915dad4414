"""Training throughput: drift's batching and dtypes against the naive recipe and TRL's SFTTrainer.

Sides (`--sides`, each `RECIPE:DTYPE`, DTYPE auto, float32 or bfloat16):
- random: drift, one example per row padded to the longest of a random batch (the naive recipe);
- group: drift's default, micro-batches of rows of similar length;
- pack: drift, the micro-batch's rows in one padding-free row with per-sequence position ids;
- trl: TRL's SFTTrainer (`pip install -e .[bench]`) on the same rows as prompt-completion pairs
  (the conversation before the trained message, and that message), loss on the completion only,
  with drift's settings where the two share them (batch, learning rate, warmup, scheduler, weight
  decay, clipping, max_length, seed). It ignores the weights and needs `turns=last`; its
  tokenization also trains the newline after `<|im_end|>`, which drift does not.
Every side trains one epoch (`--epochs`) over the same rows with the same batch size. drift sides run
the real `run_train` (weighted loss, AdamW steps); the rows are those it keeps (|weight| >=
`--min-weight`), and TRL gets the same.

Each side runs in its own process (its peak resident memory, VmHWM, is its own). Seconds are the
wall and CPU time of `Trainer.train` (the training loop, model loading excluded); tokens/s counts
non-padding input tokens.

    python benchmarks/train_bench.py --data runs/demo/weights/weighted.jsonl     # drift auto, fp32, TRL
    python benchmarks/train_bench.py --sides random:auto,group:auto,pack:auto   # synthetic rows
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from drift.config import build
from drift.ledger import peak_memory
from drift.records import read_jsonl
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


class Timed:
    """Wall and CPU seconds of every `Trainer.train` call in this process (drift's and TRL's trainers
    both inherit it), so every side is timed over the same span."""

    wall = cpu = 0.0

    @classmethod
    def install(cls) -> None:
        train = transformers.Trainer.train

        def timed(self, *args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return train(self, *args, **kwargs)
            finally:
                cls.wall += time.perf_counter() - wall
                cls.cpu += time.process_time() - cpu

        transformers.Trainer.train = timed


def drift_config(args: argparse.Namespace, recipe: str, dtype: str, output: str) -> TrainConfig:
    return build(TrainConfig, dict(
        model=args.model, data=args.data, output=output, batching=recipe, turns=args.turns, dtype=dtype,
        batch_size=args.batch_size, grad_accum=1, epochs=args.epochs, max_length=args.max_length, lr=args.lr,
        min_weight=args.min_weight, logging_steps=10, save_steps=0, seed=args.seed))


def run_drift(args: argparse.Namespace, recipe: str, dtype: str, work: Path) -> dict:
    s = run_train(drift_config(args, recipe, dtype, str(work / f"{recipe}-{dtype}")))
    return {"dtype": s["hardware"]["dtype"], "rows": s["data"]["rows_used"], "steps": s["steps"],
            "tokens": s["tokens"], "trained_tokens": s["trained_tokens"], "padding_share": s["padding_share"],
            "final_loss": s["final_loss"]}


def run_trl(args: argparse.Namespace, dtype: str, work: Path) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from drift.hardware import default_device, resolve_dtype
    from drift.models import load_tokenizer, resolve_model

    if args.turns != "last":
        raise SystemExit("the trl side trains the last assistant message only: use --turns last")
    cfg = drift_config(args, "random", dtype, str(work / f"trl-{dtype}"))
    kept = [r for _, r in read_jsonl(Path(args.data)) if abs(r["weight"]) >= args.min_weight]
    pairs = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in kept])
    path = resolve_model(args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    sft = SFTConfig(output_dir=cfg.output, per_device_train_batch_size=cfg.batch_size, num_train_epochs=cfg.epochs,
                    learning_rate=cfg.lr, warmup_steps=cfg.warmup_ratio, lr_scheduler_type=cfg.lr_scheduler,
                    weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, seed=cfg.seed,
                    bf16=resolve_dtype(dtype, default_device()) == "bfloat16", max_length=cfg.max_length,
                    completion_only_loss=True, packing=False, logging_steps=cfg.logging_steps, save_strategy="no",
                    report_to="none", use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=sft, train_dataset=pairs, processing_class=load_tokenizer(args.model, path))
    result = trainer.train()
    data = trainer.train_dataset
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"dtype": "bfloat16" if sft.bf16 else "float32", "rows": len(data), "steps": trainer.state.global_step,
            "tokens": int(sum(len(ids) for ids in data["input_ids"]) * cfg.epochs),
            "trained_tokens": int(sum(sum(t != -100 for t in labels) for labels in data["labels"]) * cfg.epochs),
            "padding_share": None, "final_loss": losses[-1] if losses else result.training_loss}


def run_side(args: argparse.Namespace) -> None:
    """Child process: train one side, print its result as the last line of JSON."""
    torch.set_num_threads(args.threads)
    Timed.install()
    recipe, dtype = args.side.split(":")
    work = Path(args.work)
    result = run_trl(args, dtype, work) if recipe == "trl" else run_drift(args, recipe, dtype, work)
    result.update(side=args.side, recipe=recipe, threads=torch.get_num_threads(), seconds=Timed.wall,
                  cpu_seconds=Timed.cpu, peak_rss_mb=peak_memory() / 2**20)
    print(json.dumps(result), flush=True)


def table(results: list[dict], args: argparse.Namespace) -> str:
    lines = [f"{results[0]['rows']} rows, turns={args.turns}, batch {args.batch_size}, {args.epochs:g} epoch(s), "
             f"{args.threads} thread(s)", "",
             "| side | dtype | steps | wall s | CPU s | tokens | trained tokens | padding | tokens/s (wall) "
             "| tokens/s (CPU) | final loss | peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        name = {"random": "drift, naive batching (random)", "trl": "TRL SFTTrainer"}.get(r["recipe"],
                                                                                      f"drift ({r['recipe']})")
        pad = "–" if r["padding_share"] is None else f"{100 * r['padding_share']:.1f}%"
        lines.append(f"| {name} | {r['dtype']} | {r['steps']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | "
                     f"{r['tokens']:,} | {r['trained_tokens']:,} | {pad} | {r['tokens'] / r['seconds']:.0f} | "
                     f"{r['tokens'] / r['cpu_seconds']:.0f} | {r['final_loss']:.4f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", help="weighted JSONL (`drift weights`); default: synthetic try-again conversations")
    p.add_argument("--rows", type=int, default=48, help="synthetic conversations")
    p.add_argument("--sides", default="group:auto,group:float32,trl:auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--min-weight", type=float, default=1e-3, help="drop rows below this |weight| (drift train's rule)")
    p.add_argument("--turns", default="last", choices=["last", "all"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per side")
    p.add_argument("--work", help="directory for data and outputs (default: a temporary one)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--side", help=argparse.SUPPRESS)  # internal: run this one side in this process
    args = p.parse_args()
    if args.side:
        return run_side(args)
    work = Path(args.work or tempfile.mkdtemp(prefix="drift-train-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.data is None:
        args.data = str(work / "synthetic.jsonl")
        Path(args.data).write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(args.rows, args.seed)))
    results = []
    for side in args.sides.split(","):
        print(f"side {side} ...", flush=True)
        command = [sys.executable, __file__, *sys.argv[1:], "--data", args.data, "--work", str(work), "--side", side]
        child = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(f"  {results[-1]}", flush=True)
    print(table(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
