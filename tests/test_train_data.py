"""Masks, row validation, truncation and batching of weighted training rows."""

from __future__ import annotations

import json

import pytest
import torch

from drift import DriftError
from drift.train.data import (GlobalBatchSampler, RowError, collate, load_examples, tokenize_conversation,
                              tokenize_row, truncate)
from drift.train.inspect import inspect_row, mark_trained
from drift.train.loss import loss_targets

CONV = [
    {"role": "system", "content": "You're a helpful assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<answer>5</answer>"},
    {"role": "user", "content": "Incorrect. Please think again."},
    {"role": "assistant", "content": "<answer>4</answer>"},
]


def trained_spans(tokenizer, ids, mask):
    """Decoded runs of trained tokens."""
    spans, cur = [], []
    for t, m in zip(ids + [None], mask + [0]):
        if m:
            cur.append(t)
        elif cur:
            spans.append(tokenizer.decode(cur))
            cur = []
    return spans


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("family,end", [("tiny_tokenizer", "<|im_end|>"), ("llama3_tokenizer", "<|eot_id|>")])
def test_masks_last_and_all_turns(family, end, request):
    tok = request.getfixturevalue(family)
    ids, mask = tokenize_conversation(CONV, tok, "last")
    assert trained_spans(tok, ids, mask) == [f"<answer>4</answer>{end}"]
    assert tok.decode(ids) == tok.apply_chat_template(CONV, tokenize=False).rstrip("\n")
    ids, mask = tokenize_conversation(CONV, tok, "all")
    assert trained_spans(tok, ids, mask) == [f"<answer>5</answer>{end}", f"<answer>4</answer>{end}"]
    untrained = tok.decode([t for t, m in zip(ids, mask) if not m])
    for text in ("You're a helpful assistant.", "What is 2+2?", "Incorrect. Please think again.", "assistant"):
        assert text in untrained  # system, user, feedback turns and role headers are never trained


def test_chatml_newline_after_end_of_turn_not_trained(tiny_tokenizer):
    ids, mask = tokenize_conversation(CONV, tiny_tokenizer, "all")
    text = mark_trained(ids, mask, tiny_tokenizer)
    assert "[[<answer>5</answer><|im_end|>]]\n<|im_start|>user" in text
    assert text.endswith("[[<answer>4</answer><|im_end|>]]")  # trailing template glue dropped


def trajectory_row(finish_reasons, messages=CONV):
    turns = [{"response": "", "answer": None, "answer_norm": None, "status": "wrong", "tokens": 5,
              "finish_reason": r} for r in finish_reasons]
    return {"prompt_id": "p", "sample_idx": 0, "messages": messages, "turns": turns, "weight": 1.0}


def test_turn_cut_at_max_new_tokens_trains_no_end_of_turn(tiny_tokenizer):
    tok = tiny_tokenizer
    ids, mask, cut = tokenize_row(trajectory_row(["length", "stop"]), tok, "all")
    assert cut == 1
    assert trained_spans(tok, ids, mask) == ["<answer>5</answer>", "<answer>4</answer><|im_end|>"]
    assert "<answer>5</answer><|im_end|>" in tok.decode(ids)  # still in the context of the next turn
    ids, mask, cut = tokenize_row(trajectory_row(["stop", "length"]), tok, "last")
    assert cut == 1 and trained_spans(tok, ids, mask) == ["<answer>4</answer>"]
    assert tok.decode(ids).endswith("<answer>4</answer>")  # nothing after the last trained token
    ids, mask, cut = tokenize_row(trajectory_row(["length", "stop"]), tok, "last")
    assert cut == 0 and trained_spans(tok, ids, mask) == ["<answer>4</answer><|im_end|>"]
    # rows without turns (plain messages + weight) train every end-of-turn token
    ids, mask, cut = tokenize_row({"messages": CONV, "weight": 1.0}, tok, "all")
    assert cut == 0 and trained_spans(tok, ids, mask)[0] == "<answer>5</answer><|im_end|>"


def test_empty_turn_cut_at_max_new_tokens_has_nothing_to_train(tmp_path, tiny_tokenizer):
    empty = CONV[:-1] + [{"role": "assistant", "content": ""}]
    path = write_rows(tmp_path / "w.jsonl", [trajectory_row(["stop", "length"]),
                                            trajectory_row(["stop", "length"], empty),
                                            trajectory_row(["stop", "stop", "stop"])])
    with pytest.raises(DriftError, match="w.jsonl:2: nothing to train"):
        load_examples(path, tiny_tokenizer)
    examples, stats = load_examples(path, tiny_tokenizer, skip_bad_rows=True)
    assert len(examples) == 1 and stats.turns_cut_at_length == 1
    assert stats.skipped == {"nothing_to_train": 1, "turns_invalid": 1}  # 3 turns, 2 assistant messages


def test_conversation_must_end_with_assistant(tiny_tokenizer):
    with pytest.raises(RowError, match="does not end with an assistant"):
        tokenize_conversation(CONV[:-1], tiny_tokenizer)


def test_template_not_append_only_is_an_error(tiny_tokenizer):
    import copy

    bad = copy.deepcopy(tiny_tokenizer)
    bad.chat_template = "{{ messages|length }}" + tiny_tokenizer.chat_template
    with pytest.raises(RowError, match="not append-only"):
        tokenize_conversation(CONV, bad, "all")


def test_template_without_end_of_turn_token_is_an_error(tiny_tokenizer):
    import copy

    bad = copy.deepcopy(tiny_tokenizer)
    bad.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}" \
                        "{% if add_generation_prompt %}assistant: {% endif %}"
    with pytest.raises(DriftError, match="end-of-turn"):
        tokenize_conversation(CONV, bad)


def test_truncate_prompt_from_left_then_completion():
    ids, mask = list(range(10)), [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert truncate(ids, mask, 10) == (ids, mask, 0, 0)
    assert truncate(ids, mask, 7) == ([3, 4, 5, 6, 7, 8, 9], [0, 0, 0, 1, 1, 1, 1], 3, 0)
    # one prompt token is always kept so the first trained token has a context; then cut the end
    assert truncate(ids, mask, 3) == ([5, 6, 7], [0, 1, 1], 5, 2)
    # several trained turns: earlier turns go first, the last one is kept whole if it fits
    two_turns = [0, 0, 1, 1, 0, 0, 1, 1, 1, 1]
    assert truncate(ids, two_turns, 5) == ([5, 6, 7, 8, 9], [0, 1, 1, 1, 1], 5, 0)


def test_truncation_inside_an_earlier_trained_turn_leaves_no_target_first():
    # turns=all: the left cut of 3 falls inside the first trained turn (positions 1-3)
    ids, mask = list(range(10)), [0, 1, 1, 1, 0, 0, 1, 1, 1, 1]
    assert truncate(ids, mask, 7) == ([3, 4, 5, 6, 7, 8, 9], [0, 0, 0, 1, 1, 1, 1], 3, 0)
    # packed after another row, position 0 would be predicted by that row's last token
    from drift.train.data import Example

    cut_ids, cut_mask, _, _ = truncate(ids, [0, 0, 1, 1, 1, 0, 0, 1, 1, 1], 8)
    assert cut_mask[0] == 0
    packed = collate([Example([1, 2], [0, 1], 1.0, 1), Example(cut_ids, cut_mask, 1.0, 2)], pad_id=0, pack=True)
    assert packed["labels"][0, 2].item() == -100  # the second row's first token is no target
    # padded: every token counted as trained is a target, so the targets' weights sum to the row's weight
    padded = collate([Example(cut_ids, cut_mask, 1.0, 2)], pad_id=0)
    _, _, weights = loss_targets(padded["labels"], padded["token_weight"])
    assert weights.sum().item() == pytest.approx(1.0)


def test_load_examples_counts_truncation_and_min_weight(tmp_path, tiny_tokenizer):
    long_conv = [{"role": "user", "content": "x" * 400}, {"role": "assistant", "content": "y" * 10}]
    path = write_rows(tmp_path / "w.jsonl", [
        {"messages": CONV, "weight": 2.0},
        {"messages": CONV, "weight": 5e-5},
        {"messages": long_conv, "weight": 1.0},
    ])
    examples, stats = load_examples(path, tiny_tokenizer, "last", max_length=200, min_weight=1e-3)
    assert [e.line for e in examples] == [1, 3]
    # 2 of 3 valid rows kept: weights scaled by 2/3, so mean_i(w_i loss_i) keeps the reference's scale
    assert stats.weight_scale == pytest.approx(2 / 3)
    assert [e.weight for e in examples] == pytest.approx([4 / 3, 2 / 3])
    assert len(examples[1].input_ids) == 200 and sum(examples[1].mask) == 11  # 10 chars + <|im_end|>
    assert stats.prompt_truncated == 1 and stats.completion_truncated == 0
    assert stats.dropped_min_weight == 1 and stats.dropped_min_weight_tokens == len(examples[0].input_ids)
    assert stats.weight_share_dropped == pytest.approx(5e-5 / 3.00005)
    assert stats.rows_read == 3 and stats.rows_used == 2
    assert stats.trained_tokens == sum(sum(e.mask) for e in examples)


@pytest.mark.parametrize("row,message", [
    ({"messages": CONV}, "no 'weight'"),
    ({"messages": CONV, "weight": float("nan")}, "not finite"),
    ({"messages": CONV, "weight": float("inf")}, "not finite"),
    ({"messages": CONV, "weight": "1"}, "not a number"),
    ({"messages": CONV, "weight": -0.5}, "negative weight"),
    ({"messages": CONV[:-1], "weight": 1.0}, "does not end with an assistant"),
    ({"messages": "hi", "weight": 1.0}, "no 'messages'"),
])
def test_bad_rows_name_the_line_or_are_counted(tmp_path, tiny_tokenizer, row, message):
    path = write_rows(tmp_path / "w.jsonl", [{"messages": CONV, "weight": 1.0}, row])
    with pytest.raises(DriftError, match=f"w.jsonl:2: .*{message}"):
        load_examples(path, tiny_tokenizer)
    examples, stats = load_examples(path, tiny_tokenizer, skip_bad_rows=True)
    assert len(examples) == 1 and sum(stats.skipped.values()) == 1


def test_rows_from_a_newer_drift_are_refused_even_when_skipping_bad_rows(tmp_path, tiny_tokenizer):
    row = {"messages": CONV, "weight": 1.0}
    path = write_rows(tmp_path / "w.jsonl", [row, {**row, "schema_version": 99}])
    for skip in (False, True):
        with pytest.raises(DriftError, match="w.jsonl:2: written with schema_version 99, but this drift reads up to 1"):
            load_examples(path, tiny_tokenizer, skip_bad_rows=skip)
    with pytest.raises(DriftError, match="w.jsonl:2: written with schema_version 99"):
        inspect_row(path, str(tmp_path), 2)


def test_negative_weights_when_allowed(tmp_path, tiny_tokenizer):
    path = write_rows(tmp_path / "w.jsonl", [{"messages": CONV, "weight": -0.5}, {"messages": CONV, "weight": 0.5}])
    examples, _ = load_examples(path, tiny_tokenizer, allow_negative_weights=True)
    assert [e.weight for e in examples] == [-0.5, 0.5]


def test_nothing_left_is_an_error(tmp_path, tiny_tokenizer):
    path = write_rows(tmp_path / "w.jsonl", [{"messages": CONV, "weight": 1e-6}])
    with pytest.raises(DriftError, match="no rows left"):
        load_examples(path, tiny_tokenizer, min_weight=1e-3)


def test_collate_padded_and_packed_carry_weights_per_token(tiny_tokenizer):
    from drift.train.data import Example

    a = Example([1, 2, 3, 4], [0, 0, 1, 1], 2.0, 1)
    b = Example([5, 6, 7], [0, 1, 1], 0.5, 2)
    padded = collate([a, b], pad_id=0)
    assert padded["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 0]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert padded["labels"].tolist() == [[-100, -100, 3, 4], [-100, 6, 7, -100]]
    assert padded["token_weight"].tolist() == [[0, 0, 1.0, 1.0], [0, 0.25, 0.25, 0]]
    assert padded["weight"].tolist() == [2.0, 0.5]
    packed = collate([a, b], pad_id=0, pack=True)
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert packed["labels"].tolist() == [[-100, -100, 3, 4, -100, 6, 7]]
    assert "attention_mask" not in packed
    assert torch.allclose(packed["token_weight"].sum(), torch.tensor(2.5))


def test_global_batches_do_not_depend_on_the_micro_batch_split():
    lengths = [(i * 37) % 101 + 1 for i in range(50)]
    for order in ("random", "group"):
        one = list(GlobalBatchSampler(lengths, batch_size=1, grad_accum=4, order=order, seed=3))
        four = list(GlobalBatchSampler(lengths, batch_size=4, grad_accum=1, order=order, seed=3))
        two_ranks = list(GlobalBatchSampler(lengths, batch_size=2, grad_accum=1, world_size=2, order=order, seed=3))
        assert sorted(i for b in four for i in b) == list(range(50))  # every row once: 12 batches of 4, one of 2
        assert [len(b) for b in four] == [4] * 12 + [2]
        # the same global batches, in the same order, however they are cut into micro-batches or ranks
        assert [sum(one[i:i + 4], []) for i in range(0, len(one), 4)] == four
        assert [sum(two_ranks[i:i + 2], []) for i in range(0, len(two_ranks), 2)] == four


def test_group_order_cuts_padding_and_changes_with_epoch():
    lengths = [(i * 7919) % 500 + 10 for i in range(400)]

    def padding(order):
        s = GlobalBatchSampler(lengths, batch_size=8, order=order, seed=0)
        return sum(8 * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in s)

    assert padding("group") < 0.1 * padding("random")
    s = GlobalBatchSampler(lengths, batch_size=8, order="group", seed=0)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first


def test_last_global_batch_split_over_ranks():
    s = GlobalBatchSampler([5] * 11, batch_size=2, grad_accum=2, world_size=2, order="random")
    sizes = [len(b) for b in s]
    assert sizes == [2, 2, 2, 2, 2, 1] and len(s) % 2 == 0  # 3 left over rows: 2 + 1 over two ranks
    s = GlobalBatchSampler([5] * 9, batch_size=2, grad_accum=1, world_size=2, order="random")
    assert [len(b) for b in s] == [2, 2, 2, 2] and s.dropped == 1  # one row cannot feed two ranks


def test_inspect_marks_trained_tokens(tmp_path, tiny_model_dir):
    path = write_rows(tmp_path / "w.jsonl", [{"messages": CONV, "weight": 0.25}])
    text = inspect_row(str(path), str(tiny_model_dir), row=1, turns="all")
    assert "weight 0.25" in text
    assert "<|im_start|>assistant\n[[<answer>5</answer><|im_end|>]]\n<|im_start|>user\nIncorrect." in text
    path = write_rows(tmp_path / "t.jsonl", [trajectory_row(["stop", "length"])])
    text = inspect_row(str(path), str(tiny_model_dir), row=1, turns="last")
    assert "1 trained turn(s) hit max_new_tokens" in text and text.endswith("[[<answer>4</answer>]]")
    with pytest.raises(DriftError, match="no row on line 7"):
        inspect_row(str(path), str(tiny_model_dir), row=7)
