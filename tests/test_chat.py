"""The end-of-turn rule that generation and training share (`drift.chat.end_of_turn_ids`)."""

from __future__ import annotations

import copy

import pytest

from drift import DriftError
from drift.chat import end_of_turn_ids
from drift.train.data import tokenize_conversation

CONV = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]


def test_end_of_turn_ids_are_eos_the_models_eos_and_the_known_end_tokens(tiny_tokenizer, llama3_tokenizer):
    ids = tiny_tokenizer.convert_tokens_to_ids
    # chatml's eos is <|im_end|>; <|eot_id|> is in the vocabulary too; <|im_start|>, <|pad|> never end a turn
    assert end_of_turn_ids(tiny_tokenizer) == {ids("<|im_end|>"), ids("<|eot_id|>")}
    assert end_of_turn_ids(tiny_tokenizer, ids("<|pad|>")) == {ids("<|im_end|>"), ids("<|eot_id|>"), ids("<|pad|>")}
    assert end_of_turn_ids(tiny_tokenizer, [0, 1]) == {0, 1, ids("<|im_end|>"), ids("<|eot_id|>")}
    assert end_of_turn_ids(llama3_tokenizer) == {llama3_tokenizer.convert_tokens_to_ids("<|eot_id|>"),
                                                 llama3_tokenizer.convert_tokens_to_ids("<|im_end|>")}


def test_a_turn_closed_by_a_special_token_generation_does_not_stop_at_is_refused(tiny_tokenizer):
    """Training that token would teach a stop the backend never honours."""
    bad = copy.deepcopy(tiny_tokenizer)
    bad.chat_template = tiny_tokenizer.chat_template.replace("'<|im_end|>'", "'<|pad|>'")
    with pytest.raises(DriftError, match="end-of-turn"):
        tokenize_conversation(CONV, bad)
    ids, mask = tokenize_conversation(CONV, tiny_tokenizer)
    assert ids[max(i for i, m in enumerate(mask) if m)] == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
