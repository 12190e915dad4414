"""Rollout speed: drift's hf backend against a naive `generate` loop, same prompts, same process.

Both drive the same multi-turn try-again loop (`drift.env.Episode` on mc-arith problems) in turn
lockstep: every live conversation generates its next turn, the environment judges it, repeat.
- naive: re-render every live conversation each turn, left-pad, one `model.generate` per batch
  (turn 1: each of the n samples is its own row);
- drift: `HFBackend` (prompt shared across its samples, KV caches kept between turns,
  continuous batching).
The texts differ (different samplers), so the token counts differ somewhat; compare
generated tokens per second as well as wall time.

    python benchmarks/rollout_bench.py --prompts 16 --n 8 --max-turns 4
"""

from __future__ import annotations

import argparse
import time

import torch

from drift.env import EnvConfig, Episode
from drift.models import DEFAULT_MODEL, load_model_and_tokenizer, resolve_model
from drift.rollout.hf import HFBackend
from drift.rollout.protocol import GenRequest, SamplingParams
from drift.tasks import TaskSpec, load_tasks


def episodes(args: argparse.Namespace) -> list[list[Episode]]:
    problems = load_tasks(TaskSpec(tasks="mc-arith", num_problems=args.prompts, split="train"))
    env = EnvConfig(max_turns=args.max_turns)
    return [[Episode(p, i, env) for i in range(args.n)] for p in problems]


def run_drift(args: argparse.Namespace, path: str) -> dict:
    backend = HFBackend(path, batch_size=args.batch_size, threads=args.threads)
    params = SamplingParams(args.temperature, args.top_p, args.max_new_tokens, args.seed)
    groups = episodes(args)
    t0 = time.perf_counter()
    requests = [(GenRequest([(ep.problem.id, ep.trajectory.sample_idx) for ep in g], list(g[0].messages), 1), g)
                for g in groups]
    turn = 1
    while requests:
        outputs = backend.generate([r for r, _ in requests], params)
        progress("drift", turn, sum(len(r.conv_ids) for r, _ in requests), t0)
        live = []
        for (req, eps), outs in zip(requests, outputs):
            for conv, ep, out in zip(req.conv_ids, eps, outs):
                ep.step(out.text, out.tokens, out.finish_reason)
                if ep.done:
                    backend.release([conv])
                else:
                    live.append((GenRequest([conv], list(ep.messages), turn + 1), [ep]))
        requests, turn = live, turn + 1
    return summary("drift hf backend", time.perf_counter() - t0, backend.stats.prefill_tokens,
                   backend.stats.generated_tokens, groups,
                   extra=f"reused {backend.reused_tokens} cached tokens, {backend.cache_mismatches} cache mismatches")


def run_naive(args: argparse.Namespace, path: str) -> dict:
    model, tok = load_model_and_tokenizer(path)
    tok.padding_side = "left"
    stop = [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    groups = episodes(args)
    prefill = generated = 0
    t0 = time.perf_counter()
    live, turn = [ep for g in groups for ep in g], 1
    while live:
        texts = [tok.apply_chat_template(ep.messages, tokenize=False, add_generation_prompt=True) for ep in live]
        for b in range(0, len(live), args.batch_size):
            batch = tok(texts[b : b + args.batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            prefill += int(batch["attention_mask"].sum())
            torch.manual_seed(args.seed + b)
            with torch.inference_mode():
                out = model.generate(**batch, do_sample=args.temperature > 0, temperature=args.temperature or None,
                                     top_p=args.top_p, max_new_tokens=args.max_new_tokens, eos_token_id=stop,
                                     pad_token_id=tok.pad_token_id)
            for ep, row in zip(live[b : b + args.batch_size], out[:, batch["input_ids"].shape[1]:].tolist()):
                n = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
                generated += n
                finish = "stop" if row[n - 1] in stop else "length"
                ep.step(tok.decode(row[: n - (finish == "stop")], skip_special_tokens=True), n, finish)
        progress("naive", turn, len(live), t0)
        live, turn = [ep for ep in live if not ep.done], turn + 1
    return summary("naive generate loop", time.perf_counter() - t0, prefill, generated, groups)


def progress(name: str, turn: int, rows: int, t0: float) -> None:
    print(f"  {name} turn {turn}: {rows} conversations, {time.perf_counter() - t0:.1f} s elapsed", flush=True)


def summary(name: str, seconds: float, prefill: int, generated: int, groups: list[list[Episode]],
            extra: str = "") -> dict:
    eps = [ep for g in groups for ep in g]
    turns = sum(len(ep.trajectory.turns) for ep in eps)
    solved = sum(ep.trajectory.success_turn is not None for ep in eps)
    print(f"{name}: {seconds:.1f} s, {turns} turns, prefill {prefill} tokens, generated {generated} tokens "
          f"({generated / seconds:.1f} tok/s), prefill/generated {prefill / max(generated, 1):.2f}, "
          f"solved {solved}/{len(eps)}" + (f"; {extra}" if extra else ""), flush=True)
    return {"seconds": seconds, "prefill": prefill, "generated": generated}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-turns", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["drift", "naive"], help="run one side only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    results = {}
    if args.only != "naive":
        results["drift"] = run_drift(args, path)
    if args.only != "drift":
        results["naive"] = run_naive(args, path)
    if len(results) == 2:
        d, n = results["drift"], results["naive"]
        print(f"speed-up: {n['seconds'] / d['seconds']:.2f}x wall time, "
              f"{(d['generated'] / d['seconds']) / (n['generated'] / n['seconds']):.2f}x generated tokens/s")


if __name__ == "__main__":
    main()
