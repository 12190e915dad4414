"""How often greedy first answers agree: drift's hf backend (an eval run's rollout) against
transformers' own `generate` in the same dtype, and `generate` against itself at batch 1 and 16.

In float32 they should all agree; in bf16 logits round to 8 bits of mantissa, near-tied
continuations flip with the batch layout, and this measures by how much.

    drift eval --model smollm2-135m --tasks mc-arith --split test --num-problems 64 --max-turns 4 \\
        --max-new-tokens 48 --batch-size 32 --dtype bfloat16 --output runs/base-bf16
    python benchmarks/greedy_agreement.py runs/base-bf16 --dtype bfloat16
    python benchmarks/greedy_agreement.py runs/base-bf16 --against runs/base-fp32   # two eval runs
"""

from __future__ import annotations

import argparse

import torch

from drift.models import DEFAULT_MODEL, load_model_and_tokenizer, resolve_model
from drift.records import read_trajectories


def first_answers(model, tok, prompts: list[list[dict]], batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy first answers of `generate`, left-padded batches of `batch_size`."""
    tok.padding_side = "left"
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    out = []
    for i in range(0, len(prompts), batch_size):
        texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                 for p in prompts[i:i + batch_size]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            ids = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop,
                                 pad_token_id=tok.pad_token_id)
        out += [tok.decode(r, skip_special_tokens=True).strip() for r in ids[:, enc["input_ids"].shape[1]:]]
    return out


def first_of(trajs: list) -> list[str]:
    return [next(m["content"] for m in t.messages if m["role"] == "assistant").strip() for t in trajs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("eval_dir", help="a `drift eval` output directory of the same model and dtype")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--against", help="instead: compare with the first answers of this other eval directory")
    args = p.parse_args()
    trajs = read_trajectories(f"{args.eval_dir}/rollout")
    prompts = [t.messages[:2] for t in trajs]
    drift = first_of(trajs)
    if args.against:
        theirs = read_trajectories(f"{args.against}/rollout")
        other = dict(zip([t.prompt_id for t in theirs], first_of(theirs)))
        same = sum(a == other[t.prompt_id] for t, a in zip(trajs, drift))
        print(f"{len(trajs)} first answers, identical in {args.eval_dir} and {args.against}: {same}")
        return
    model, tok = load_model_and_tokenizer(resolve_model(args.model), dtype=args.dtype, device="cpu")
    one = first_answers(model, tok, prompts, 1, args.max_new_tokens)
    sixteen = first_answers(model, tok, prompts, 16, args.max_new_tokens)
    same = lambda a, b: sum(x == y for x, y in zip(a, b))  # noqa: E731
    print(f"{args.dtype}, {len(trajs)} first answers, identical: drift vs generate batch 16 {same(drift, sixteen)}, "
          f"drift vs generate batch 1 {same(drift, one)}, generate batch 1 vs batch 16 {same(one, sixteen)}")


if __name__ == "__main__":
    main()
