"""Weighted fine-tuning on a tiny random Llama: the loss against hand computation, invariances,
saving, LoRA and resuming."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from drift import DriftError
from drift.config import build
from drift.train.data import Example, GlobalBatchSampler, collate, tokenize_conversation
from drift.train.loss import loss_targets, weighted_nll_sum
from drift.train.trainer import TrainConfig, WeightedTrainer, run_train


def make_rows(n: int, seed: int = 0, weights: list[float] | None = None) -> list[dict]:
    """Try-again conversations of 1-3 turns with varied lengths."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        msgs = [{"role": "system", "content": "You're a helpful assistant."},
                {"role": "user", "content": f"What is {i} + {i}?" + " please" * rng.randint(0, 6)}]
        for _ in range(rng.randint(1, 3)):
            answer = f"<answer>{rng.randint(0, 99)}</answer>" + "!" * rng.randint(0, 30)
            msgs.append({"role": "assistant", "content": answer})
            msgs.append({"role": "user", "content": "Incorrect. Please think again."})
        rows.append({"messages": msgs[:-1], "weight": weights[i] if weights else rng.choice([0.25, 1.0, 3.0])})
    return rows


def write_data(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def train(tmp_path, model_dir, data, name="out", **kw):
    base = dict(model=str(model_dir), data=data, output=str(tmp_path / name), lr=1e-3, epochs=1, warmup_ratio=0,
                weight_decay=0, logging_steps=1, save_steps=0, min_weight=0, batch_size=4)
    return run_train(build(TrainConfig, {**base, **kw}))


def hand_terms(model_dir, rows, turns):
    """w_i * (mean NLL of row i's trained tokens) for every row, with plain cross_entropy."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    terms = []
    with torch.no_grad():
        for r in rows:
            ids, mask = tokenize_conversation(r["messages"], tok, turns)
            logits = model(torch.tensor([ids])).logits[0]
            nll = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
            terms.append(r["weight"] * nll[torch.tensor(mask[1:]) == 1].mean().item())
    return terms


def hand_loss(model_dir, rows, turns, normalize):
    """sum_i w_i * loss_i / (N or sum w); one global batch of all rows (constant: N * mean w = sum w)."""
    weights = [r["weight"] for r in rows]
    return sum(hand_terms(model_dir, rows, turns)) / (len(rows) if normalize == "mean" else sum(weights))


def final_params(out):
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("weights,normalize,turns", [
    ("ones", "mean", "last"), ("ones", "weight_sum", "all"),
    ("varied", "mean", "all"), ("varied", "weight_sum", "last"), ("varied", "constant", "all"),
])
def test_loss_equals_hand_computation(tmp_path, tiny_model_dir, weights, normalize, turns):
    """One global batch of all rows: the logged first-step loss is the formula; weights 1 = plain SFT."""
    rows = make_rows(6, weights=[1.0] * 6 if weights == "ones" else None)
    summary = train(tmp_path, tiny_model_dir, write_data(tmp_path / "w.jsonl", rows), batch_size=6,
                    normalize=normalize, turns=turns, max_steps=1)
    assert summary["history"][0]["loss"] == pytest.approx(hand_loss(tiny_model_dir, rows, turns, normalize), rel=1e-5)


def test_loss_targets_keep_only_predicting_positions():
    labels = torch.tensor([[-100, -100, -100, 4], [-100, -100, 7, -100]])
    token_weight = torch.tensor([[0, 0, 0, 0.5], [0, 0, 2.0, 0]])
    keep, targets, weights = loss_targets(labels, token_weight)
    assert keep.tolist() == [1, 2]  # logits at t predict token t + 1
    assert targets.tolist() == [[-100, 4], [7, -100]]
    assert weights.tolist() == [[0, 0.5], [2.0, 0]]


def test_weight_zero_row_contributes_no_gradient(tiny_model_dir, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rows = make_rows(2, seed=1)
    a, b = (Example(*tokenize_conversation(r["messages"], tiny_tokenizer, "all"), w, i)
            for i, (r, w) in enumerate(zip(rows, [2.0, 0.0])))

    def grads(examples):
        model.zero_grad()
        batch = collate(examples, tiny_tokenizer.pad_token_id)
        keep, targets, weights = loss_targets(batch["labels"], batch["token_weight"])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
        weighted_nll_sum(logits, targets, weights)[0].backward()  # sum_i w_i * loss_i
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    alone = grads([b])
    assert torch.count_nonzero(alone) == 0
    assert torch.allclose(grads([a, b]), grads([a]), atol=1e-6, rtol=1e-5)


def test_constant_normalizer_is_global_batch_size_times_mean_weight(tmp_path, tiny_model_dir, tiny_tokenizer):
    """Two global batches of 4 out of 8 rows: each step divides by 4 * mean_j w_j, not by its own weight sum."""
    rows = make_rows(8, seed=5)
    summary = train(tmp_path, tiny_model_dir, write_data(tmp_path / "w.jsonl", rows), batch_size=4,
                    normalize="constant", max_steps=1)
    lengths = [len(tokenize_conversation(r["messages"], tiny_tokenizer, "last")[0]) for r in rows]
    first = [rows[i] for i in GlobalBatchSampler(lengths, 4, order="group", seed=0).global_batches()[0]]
    mean_weight = sum(r["weight"] for r in rows) / 8
    assert summary["constant_normalizer"] == pytest.approx(4 * mean_weight)
    expected = sum(hand_terms(tiny_model_dir, first, "last")) / (4 * mean_weight)
    assert sum(r["weight"] for r in first) != pytest.approx(4 * mean_weight)  # the batch's own sum differs
    assert summary["history"][0]["loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("normalize,expected", [
    # weights [1, 2, 5e-5, 0.5], the third dropped: 3 of 4 valid rows kept, weights x 3/4
    ("mean", lambda terms: (terms[0] + terms[1] + terms[3]) * 0.75 / 3),  # the reference's / 4, less row 3
    ("weight_sum", lambda terms: (terms[0] + terms[1] + terms[3]) / 3.5),  # the scale cancels
])
def test_min_weight_keeps_the_reference_objective(tmp_path, tiny_model_dir, normalize, expected):
    rows = make_rows(4, seed=6, weights=[1.0, 2.0, 5e-5, 0.5])
    summary = train(tmp_path, tiny_model_dir, write_data(tmp_path / "w.jsonl", rows), batch_size=4,
                    normalize=normalize, min_weight=1e-3, max_steps=1)
    assert summary["data"]["weight_scale"] == 0.75 and summary["data"]["rows_used"] == 3
    terms = hand_terms(tiny_model_dir, rows, "last")
    assert summary["history"][0]["loss"] == pytest.approx(expected(terms), rel=1e-5)


def test_negative_nll_cap_stops_the_gradient_and_is_counted():
    # three tokens, vocabulary 4: NLL log 4 = 1.386 (uniform logits) or about 0.02 (logit 5 on the target)
    logits = torch.zeros(1, 3, 4)
    logits[0, 1, 2] = 5.0
    logits.requires_grad_(True)
    targets = torch.tensor([[1, 2, 3]])
    weights = torch.tensor([[-1.0, -1.0, 1.0]])  # past the cap / below it / positive past it
    total, stats = weighted_nll_sum(logits, targets, weights, nll_cap=1.0)
    total.backward()
    nll = -torch.log_softmax(logits.detach(), -1)[0, [0, 1, 2], [1, 2, 3]]
    assert total.item() == pytest.approx((-nll[0] - nll[1] + nll[2]).item())  # the value is not capped
    assert stats.capped == 1
    assert torch.count_nonzero(logits.grad[0, 0]) == 0
    assert torch.count_nonzero(logits.grad[0, 1]) > 0 and torch.count_nonzero(logits.grad[0, 2]) > 0


@pytest.mark.parametrize("cap", [0.0, None])
def test_negative_nll_cap_in_training(tmp_path, tiny_model_dir, cap):
    """Cap 0: every negative-weight token is past it, so nothing moves; none: gradient ascent."""
    data = write_data(tmp_path / "w.jsonl", make_rows(4, weights=[-1.0, -0.5, -2.0, -1.0]))
    summary = train(tmp_path, tiny_model_dir, data, allow_negative_weights=True, negative_nll_cap=cap, max_steps=1)
    step = summary["history"][0]
    if cap is None:
        assert summary["capped_tokens"] == 0 and step["grad_norm"] > 0
    else:
        assert summary["capped_tokens"] == summary["trained_tokens"] > 0 and step["grad_norm"] == 0


def test_warmup_ramps_then_holds(tmp_path, tiny_model_dir):
    """warmup_ratio 0.5 of 4 steps: 2 warmup steps (0, lr/2), then lr (logged: the rate each step used)."""
    data = write_data(tmp_path / "w.jsonl", make_rows(8))
    summary = train(tmp_path, tiny_model_dir, data, batch_size=2, max_steps=4, warmup_ratio=0.5)
    assert [h["learning_rate"] for h in summary["history"]] == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])


@pytest.mark.parametrize("normalize", ["weight_sum", "mean", "constant"])
def test_batch1_accum4_equals_batch4_accum1(tmp_path, tiny_model_dir, normalize):
    data = write_data(tmp_path / "w.jsonl", make_rows(10, seed=2))
    one = train(tmp_path, tiny_model_dir, data, "b1", batch_size=1, grad_accum=4, normalize=normalize, max_steps=2)
    four = train(tmp_path, tiny_model_dir, data, "b4", batch_size=4, grad_accum=1, normalize=normalize, max_steps=2)
    for h1, h4 in zip(one["history"], four["history"], strict=True):
        assert h1["loss"] == pytest.approx(h4["loss"], rel=1e-5)
        assert h1["grad_norm"] == pytest.approx(h4["grad_norm"], rel=1e-4)
    # Adam divides by sqrt(v): float noise in near-zero gradients moves a few weights by ~1e-6
    assert torch.allclose(final_params(tmp_path / "b1"), final_params(tmp_path / "b4"), atol=1e-5)


def test_packed_grouped_random_and_checkpointed_batches_agree(tmp_path, tiny_model_dir):
    """With one global batch per step holding every row, the batch layout must not matter."""
    data = write_data(tmp_path / "w.jsonl", make_rows(6, seed=3))
    runs = {b: train(tmp_path, tiny_model_dir, data, b, batching=b, batch_size=3, grad_accum=2, epochs=2,
                     gradient_checkpointing=(b == "pack"))
            for b in ("group", "pack", "random")}
    losses = {b: [h["loss"] for h in s["history"]] for b, s in runs.items()}
    assert len(losses["group"]) == 2
    assert losses["pack"] == pytest.approx(losses["group"], rel=1e-5)
    assert losses["random"] == pytest.approx(losses["group"], rel=1e-5)
    assert runs["pack"]["padding_share"] == 0 and runs["group"]["padding_share"] < runs["random"]["padding_share"]


def test_saved_model_loads_and_generates(tmp_path, tiny_model_dir):
    data = write_data(tmp_path / "w.jsonl", make_rows(5, weights=[1.0, 2.0, 5e-5, 0.5, 1.0]))
    summary = train(tmp_path, tiny_model_dir, data, max_steps=1, min_weight=1e-3)
    out = tmp_path / "out"
    assert summary["data"]["dropped_min_weight"] == 1 and summary["data"]["rows_used"] == 4
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 1
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tok.chat_template and "im_start" in tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] > ids.shape[1]


def test_lora_saves_adapter_and_merged_model(tmp_path, tiny_model_dir):
    data = write_data(tmp_path / "w.jsonl", make_rows(4))
    train(tmp_path, tiny_model_dir, data, max_steps=1, lora=True, lora_r=4, merge_lora=True, report_to="tensorboard")
    out = tmp_path / "out"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert any(out.rglob("events.out.tfevents.*"))
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    q_merged = merged.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q_merged, base.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(merged.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    assert AutoTokenizer.from_pretrained(out / "merged").chat_template
    merged.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)


def test_resume_from_checkpoint_continues_exactly(tmp_path, tiny_model_dir):
    data = write_data(tmp_path / "w.jsonl", make_rows(12, seed=4))
    full = train(tmp_path, tiny_model_dir, data, "full", max_steps=3, save_steps=1, save_total_limit=3,
                 batch_size=2)
    resumed = train(tmp_path, tiny_model_dir, data, "resumed", max_steps=3, batch_size=2,
                    resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-1"))
    assert resumed["history"][-1]["loss"] == pytest.approx(full["history"][-1]["loss"], rel=1e-5)
    assert torch.allclose(final_params(tmp_path / "full"), final_params(tmp_path / "resumed"), atol=1e-6)
    # the resumed run's summary counts the steps before the checkpoint too
    for k in ("steps", "trained_tokens", "tokens", "padding_share"):
        assert resumed[k] == full[k]
    assert resumed["cost"]["trained_tokens"] == full["cost"]["trained_tokens"] == full["tokens"]
    assert resumed["cost"]["optimizer_steps"] == 3


def test_bad_inputs_are_clear_errors(tmp_path, tiny_model_dir):
    data = write_data(tmp_path / "w.jsonl", make_rows(3, weights=[1.0, -1.0, 1.0]))
    with pytest.raises(DriftError, match="w.jsonl:2: negative weight"):
        train(tmp_path, tiny_model_dir, data)
    with pytest.raises(DriftError, match="model path not found"):
        train(tmp_path, tmp_path / "no-such-model", data)
    with pytest.raises(DriftError, match="weight_sum needs non-negative"):
        train(tmp_path, tiny_model_dir, data, normalize="weight_sum", allow_negative_weights=True)
    with pytest.raises(DriftError, match="set data"):
        train(tmp_path, tiny_model_dir, "")
    with pytest.raises(DriftError, match="lr_scheduler"):
        train(tmp_path, tiny_model_dir, data, lr_scheduler="bogus")
    with pytest.raises(DriftError, match="unknown config key 'lr_rate'"):
        train(tmp_path, tiny_model_dir, data, lr_rate=1.0)


@pytest.mark.parametrize("key,value,message", [
    ("max_steps", 0, "'max_steps' must be -1 \\(run all epochs\\) or >= 1, got 0"),
    ("max_steps", -2, "'max_steps' must be -1"),
    ("lr", -1.0, "'lr' must be a finite number > 0, got -1.0"),
    ("lr", 0.0, "'lr' must be a finite number > 0"),
    ("lr", float("nan"), "'lr' must be a finite number > 0, got nan"),
    ("lr", float("inf"), "'lr' must be a finite number > 0, got inf"),
    ("weight_decay", -0.1, "'weight_decay' must be a finite number >= 0"),
    ("max_grad_norm", -1.0, "'max_grad_norm' must be a finite number >= 0"),
    ("epochs", float("nan"), "'epochs' must be a finite number >= 0"),
    ("negative_nll_cap", -1.0, "'negative_nll_cap' must be a finite number >= 0"),
    ("lora_dropout", 1.0, "'lora_dropout' must be in \\[0, 1\\)"),
])
def test_bad_numbers_are_one_clear_error(tmp_path, key, value, message):
    cfg = build(TrainConfig, {"data": "w.jsonl", "output": str(tmp_path / "out"), key: value})
    with pytest.raises(DriftError, match=message):
        run_train(cfg)
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize("missing", [("weight",), ("token_weight",), ("weight", "token_weight")])
def test_missing_weight_column_is_refused(missing):
    """A batch that lost either weight column (e.g. to a Trainer that drops unused columns) stops the
    step before the model runs, instead of training unweighted."""
    batch = {"input_ids": torch.tensor([[1, 2]]), "labels": torch.tensor([[1, 2]]),
             "weight": torch.tensor([2.0]), "token_weight": torch.tensor([[0.0, 2.0]])}
    trainer = object.__new__(WeightedTrainer)
    with pytest.raises(RuntimeError, match="batch without the weight column: training would silently be unweighted"):
        trainer.compute_loss(None, {k: v for k, v in batch.items() if k not in missing})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_training_runs_in_both_dtypes_with_float32_master_weights(tmp_path, tiny_model_dir, dtype):
    summary = train(tmp_path, tiny_model_dir, write_data(tmp_path / "w.jsonl", make_rows(4)), dtype=dtype, max_steps=2)
    assert summary["settings"]["dtype"] == dtype and summary["steps"] == 2
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert next(saved.parameters()).dtype == torch.float32  # autocast computes in bf16; the weights stay float32
    assert len(summary["history"]) == 2  # logging_steps = 1: one loss per step, so the next line checks something
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in summary["history"])


@pytest.mark.parametrize("normalize", ["mean", "weight_sum"])
def test_pruned_rows_stay_in_the_normalizer(tmp_path, tiny_model_dir, normalize):
    """One global batch of 6 rows, two marked pruned: the step's loss is the unpruned formula less
    their terms, over the unpruned normalizer (6 rows, or the sum of all 6 weights)."""
    weights = [1.0, 2.0, 3e-4, 0.5, 1e-4, 1.5]
    rows = make_rows(6, seed=7, weights=weights)
    marked = [dict(r, pruned=True) if r["weight"] < 1e-3 else r for r in rows]
    full = train(tmp_path, tiny_model_dir, write_data(tmp_path / "full.jsonl", rows), "full", batch_size=6,
                 normalize=normalize, max_steps=1)
    pruned = train(tmp_path, tiny_model_dir, write_data(tmp_path / "pruned.jsonl", marked), "pruned", batch_size=6,
                   normalize=normalize, max_steps=1, min_weight=1e-3)  # min_weight does not touch pruned rows
    terms = hand_terms(tiny_model_dir, rows, "last")
    denom = 6 if normalize == "mean" else sum(weights)
    assert full["history"][0]["loss"] == pytest.approx(sum(terms) / denom, rel=1e-5)
    assert pruned["history"][0]["loss"] == pytest.approx((sum(terms) - terms[2] - terms[4]) / denom, rel=1e-5)
    assert pruned["data"]["pruned"] == 2 and pruned["data"]["rows_used"] == 4 and pruned["data"]["weight_scale"] == 1
    lengths = [len(tokenize_conversation(r["messages"], AutoTokenizer.from_pretrained(tiny_model_dir), "last")[0])
               for r in rows]
    assert pruned["tokens"] == full["tokens"] - lengths[2] - lengths[4]


def test_a_step_of_pruned_rows_only_still_steps(tmp_path, tiny_model_dir, tiny_tokenizer):
    """Batches of 2 out of 4 rows; every row of the first batch pruned: the run takes the unpruned run's
    2 steps, the first with loss 0 and a zero gradient (Adam's first step is then 0), so the second
    step's loss is its batch's hand-computed loss at the initial weights."""
    rows = make_rows(4, seed=8)
    lengths = [len(tokenize_conversation(r["messages"], tiny_tokenizer, "last")[0]) for r in rows]
    first, second = GlobalBatchSampler(lengths, 2, order="random", seed=0).global_batches()
    marked = [dict(r, pruned=True) if i in first else r for i, r in enumerate(rows)]
    summary = train(tmp_path, tiny_model_dir, write_data(tmp_path / "w.jsonl", marked), batch_size=2,
                    batching="random", max_grad_norm=0)
    assert summary["steps"] == 2 and summary["history"][0]["loss"] == 0
    expected = sum(hand_terms(tiny_model_dir, [rows[i] for i in second], "last")) / 2
    assert summary["history"][1]["loss"] == pytest.approx(expected, rel=1e-5)
    assert summary["tokens"] == sum(lengths[i] for i in second) + 1  # + the one padding token of step 1
