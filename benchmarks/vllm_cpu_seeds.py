"""When do seeded requests crash vLLM's CPU runner? (docs/usage.md, "vLLM on a CPU")

vLLM rewinds a seeded request's torch.Generator (`set_offset`) when the token it sampled in a
step is discarded because the request's prompt was only partly prefilled (chunked prefill); a
CPU generator has no offset, so that step raises "CPU Generator does not use offset". This script
runs the cases that tell the conditions apart on one engine (each case in order; the first crash
ends the engine, so a case that should crash goes last):

    python benchmarks/vllm_cpu_seeds.py --chunked --max-num-batched-tokens 256 short unseeded batch
    python benchmarks/vllm_cpu_seeds.py --chunked --max-num-batched-tokens 256 long
    python benchmarks/vllm_cpu_seeds.py --eager --max-num-batched-tokens 2048 demo long batch repro

Cases (token counts as SmolLM2's tokenizer makes them): short (one seeded 87-token prompt, n=1 and
n=2), unseeded (16 unseeded 557-token prompts: chunked, no seed), batch (16 seeded 87-97-token
prompts, about 1,450 tokens for one step), long (one seeded 847-token prompt), demo (64 seeded
117-128-token prompts x n=8, the issue's workload, 4 new tokens), repro (a seeded request gives
the same text alone and inside a batch of others). Results: docs/usage.md, "Seeds".
"""

from __future__ import annotations

import argparse
import os
import time

from drift.models import resolve_model


def prompt(i: int, words: int) -> dict:
    return {"prompt": f"Question {i}: " + " ".join(f"w{(i * 7 + k) % 97}" for k in range(words)) + ". Answer:"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cases", nargs="+", choices=["short", "unseeded", "batch", "long", "demo", "repro"])
    ap.add_argument("--chunked", action="store_true", help="enable_chunked_prefill (vLLM's default)")
    ap.add_argument("--max-num-batched-tokens", type=int, required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--eager", action="store_true", help="enforce_eager: no compilation (starts in a fraction of the time)")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import vllm

    t0 = time.monotonic()
    llm = vllm.LLM(model=resolve_model("smollm2-135m"), dtype=args.dtype, seed=0, max_model_len=2048,
                   enable_prefix_caching=True, enable_chunked_prefill=args.chunked,
                   max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.eager)
    tok = llm.get_tokenizer()
    print(f"engine up in {time.monotonic() - t0:.0f} s (chunked={args.chunked}, "
          f"max_num_batched_tokens={args.max_num_batched_tokens})", flush=True)

    def run(name: str, prompts: list[dict], params: list) -> list:
        lengths = sorted({len(tok(p["prompt"])["input_ids"]) for p in prompts})
        print(f"case {name}: {len(prompts)} prompts of {lengths[0]}-{lengths[-1]} tokens ...", flush=True)
        out = llm.generate(prompts, params, use_tqdm=False)
        print(f"case {name}: ok", flush=True)
        return out

    sp = vllm.SamplingParams
    for case in args.cases:
        if case == "short":
            run("short n=1", [prompt(0, 30)], [sp(n=1, seed=1, max_tokens=8)])
            run("short n=2", [prompt(0, 30)], [sp(n=2, seed=1, max_tokens=8)])
        elif case == "unseeded":
            run("unseeded", [prompt(i, 190) for i in range(16)], [sp(max_tokens=4)] * 16)
        elif case == "batch":
            run("batch", [prompt(i, 30) for i in range(16)], [sp(seed=i, max_tokens=4) for i in range(16)])
        elif case == "long":
            run("long", [prompt(0, 290)], [sp(seed=1, max_tokens=4)])
        elif case == "demo":
            run("demo", [prompt(i, 40) for i in range(64)], [sp(n=8, seed=i, max_tokens=4) for i in range(64)])
        elif case == "repro":
            alone = run("repro alone", [prompt(5, 30)], [sp(seed=11, temperature=1.0, max_tokens=24)])
            mixed = run("repro in a batch", [prompt(i, 30 + i) for i in range(12)] + [prompt(5, 30)],
                        [sp(seed=100 + i, temperature=1.0, max_tokens=24) for i in range(12)]
                        + [sp(seed=11, temperature=1.0, max_tokens=24)])
            same = alone[0].outputs[0].token_ids == mixed[-1].outputs[0].token_ids
            print(f"case repro: same tokens alone and in a batch of 13: {same}", flush=True)


if __name__ == "__main__":
    main()
