"""Rollout speed: `drift rollout` (hf backend) against a naive `generate` loop on the same prompts.

Sides (`--sides`, each `drift:DTYPE`, `drift-turns:DTYPE` or `naive:DTYPE`, DTYPE auto, float32 or
bfloat16):
- drift: the real rollout stage (`run_rollout`: the engine's multi-turn loop over `HFBackend`, which
  prefills a prompt once for its n samples, keeps KV caches between turns and batches continuously;
  a conversation's next turn joins the running decode batch as soon as its answer is judged);
- drift-turns: the same with `stream_turns = false`: one `generate` call per turn for every live
  conversation, its answers judged when the call returns;
- naive: every turn, re-render every live conversation, left-pad, one `model.generate` per batch of
  rows (turn 1: each of the n samples is its own row); sampling from the full softmax as drift does.
Both run the same environment (`drift.env.Episode`: feedback, turn limit, checks). The samplers
differ, so the texts and token counts differ a little: compare generated tokens per second.

Each side runs in its own process, so its peak resident memory (VmHWM) is its own; it is counted
from the loaded model on (the drift stage resets it there, the naive side does the same). Times
exclude model loading; CPU seconds are the side's process time over the same span (steadier than
wall time on a shared machine: with one thread a side uses one core at most).

    python benchmarks/rollout_bench.py --prompts 16 --threads 1
    python benchmarks/rollout_bench.py --prompts 64 --sides drift:auto,drift:float32 --json r.json
    python benchmarks/rollout_bench.py --prompts 16 --sides drift-turns:bfloat16,drift:bfloat16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from drift.config import build
from drift.env import EnvConfig, Episode
from drift.ledger import peak_memory, reset_peak_memory
from drift.models import load_model_and_tokenizer
from drift.rollout import RolloutConfig, make_backend, run_rollout
from drift.tasks import TaskSpec, load_tasks


def rollout_config(args: argparse.Namespace, dtype: str, output: str, stream_turns: bool = True) -> RolloutConfig:
    return build(RolloutConfig, dict(
        tasks="mc-arith", split="train", num_problems=args.prompts, n=args.n, max_turns=args.max_turns,
        temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, seed=args.seed, model=args.model, dtype=dtype, output=output,
        stream_turns=stream_turns))


def run_drift(args: argparse.Namespace, dtype: str, stream_turns: bool = True) -> dict:
    with tempfile.TemporaryDirectory(prefix="drift-rollout-bench-") as tmp:
        cfg = rollout_config(args, dtype, str(Path(tmp) / "rollout"), stream_turns)
        backend = make_backend(cfg)
        wall, cpu = time.perf_counter(), time.process_time()
        manifest = run_rollout(cfg, backend=backend)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    s = manifest["summary"]
    return {"wall_seconds": wall, "cpu_seconds": cpu, "dtype": backend.hardware["dtype"],
            "prefill": backend.stats.prefill_tokens, "generated": backend.stats.generated_tokens,
            "turns": sum(s["attempted"]), "solved": round(s["accuracy"] * s["num_trajectories"]),
            "conversations": s["num_trajectories"], "decode_steps": backend.decode_steps,
            "decode_rows": backend.decode_rows}


def run_naive(args: argparse.Namespace, dtype: str) -> dict:
    model, tok = load_model_and_tokenizer(args.model, dtype=dtype, device="cpu")
    tok.padding_side = "left"
    stop = [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    problems = load_tasks(TaskSpec(tasks="mc-arith", num_problems=args.prompts, split="train"))
    env = EnvConfig(max_turns=args.max_turns)
    episodes = [Episode(p, i, env) for p in problems for i in range(args.n)]
    prefill = generated = 0
    reset_peak_memory()  # as the drift side's stage does once its model is loaded
    wall, cpu = time.perf_counter(), time.process_time()
    live, turn = episodes, 1
    while live:
        texts = [tok.apply_chat_template(ep.messages, tokenize=False, add_generation_prompt=True) for ep in live]
        for b in range(0, len(live), args.batch_size):
            batch = tok(texts[b : b + args.batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            prefill += int(batch["attention_mask"].sum())
            torch.manual_seed(args.seed * 1_000_003 + turn * 10_007 + b)
            with torch.inference_mode():
                out = model.generate(**batch, do_sample=args.temperature > 0, temperature=args.temperature or None,
                                     top_p=args.top_p, top_k=0, max_new_tokens=args.max_new_tokens,
                                     eos_token_id=stop, pad_token_id=tok.pad_token_id)
            for ep, row in zip(live[b : b + args.batch_size], out[:, batch["input_ids"].shape[1]:].tolist()):
                n = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
                generated += n
                finish = "stop" if row[n - 1] in stop else "length"
                ep.step(tok.decode(row[: n - (finish == "stop")], skip_special_tokens=True), n, finish)
        print(f"  naive turn {turn}: {len(live)} conversations, {time.perf_counter() - wall:.0f} s", file=sys.stderr, flush=True)
        live, turn = [ep for ep in live if not ep.done], turn + 1
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"wall_seconds": wall, "cpu_seconds": cpu, "dtype": str(model.dtype).removeprefix("torch."),
            "prefill": prefill, "generated": generated, "turns": sum(len(ep.trajectory.turns) for ep in episodes),
            "solved": sum(ep.trajectory.success_turn is not None for ep in episodes), "conversations": len(episodes)}


def run_side(args: argparse.Namespace) -> None:
    """Child process: run one side, print its result as the last line of JSON."""
    torch.set_num_threads(args.threads)
    kind, dtype = args.side.split(":")
    if kind == "naive":
        result = run_naive(args, dtype)
    else:
        result = run_drift(args, dtype, stream_turns=kind == "drift")
    result.update(side=args.side, threads=torch.get_num_threads(), peak_rss_mb=peak_memory() / 2**20)
    print(json.dumps(result), flush=True)


def table(results: list[dict], args: argparse.Namespace) -> str:
    lines = [f"workload: {args.prompts} prompts x {args.n} samples x {args.max_turns} turns, "
             f"max_new_tokens {args.max_new_tokens}, batch {args.batch_size}, {args.threads} thread(s)", "",
             "| side | dtype | wall s | CPU s | prefill tokens | generated tokens | generated tok/s (wall) "
             "| generated tok/s (CPU) | prefill / generated | decode steps | rows / step | solved | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        steps = r.get("decode_steps")
        decode = f"{steps} | {r['decode_rows'] / max(steps, 1):.1f}" if steps is not None else "– | –"
        lines.append(f"| {r['side'].split(':')[0]} | {r['dtype']} | {r['wall_seconds']:.1f} | {r['cpu_seconds']:.1f} | "
                     f"{r['prefill']:,} | {r['generated']:,} | {r['generated'] / r['wall_seconds']:.0f} | "
                     f"{r['generated'] / r['cpu_seconds']:.0f} | {r['prefill'] / max(r['generated'], 1):.2f} | "
                     f"{decode} | {r['solved']}/{r['conversations']} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=64, help="mc-arith training problems (the demo: 64)")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-turns", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per side")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sides", default="drift:auto,drift:float32,naive:auto")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--side", help=argparse.SUPPRESS)  # internal: run this one side in this process
    args = ap.parse_args()
    if args.side:
        return run_side(args)
    results = []
    for side in args.sides.split(","):
        print(f"side {side} ...", flush=True)
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--side", side], check=True,
                               stdout=subprocess.PIPE, text=True)
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(f"  {results[-1]}", flush=True)
    print(table(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
