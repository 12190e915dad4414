"""The one chat-template render and the one end-of-turn rule: training masks and every generation
backend use them, so the tokens a model is trained on and the tokens it is prompted with agree
byte for byte, and the token that closes a trained turn is the one generation stops at."""

from __future__ import annotations

from typing import Any

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>")


def render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    """The conversation as text in the model's chat template (+ the assistant prompt if asked)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def render_ids(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = True) -> list[int]:
    """Token ids of `render` (the template's own special tokens, none added by the tokenizer)."""
    return tokenizer(render(tokenizer, messages, generation_prompt), add_special_tokens=False)["input_ids"]


def end_of_turn_ids(tokenizer: Any, model_eos: int | list[int] | None = None) -> set[int]:
    """The token ids that end an assistant turn: the tokenizer's end-of-sequence token, the model's
    (`generation_config.eos_token_id`, one id or a list) and the usual end-of-turn tokens of chat
    templates (END_OF_TURN_TOKENS) that the vocabulary holds. The hf backend stops at them; a
    trained turn must close with one of them (`drift.train.data`)."""
    ids = set(model_eos if isinstance(model_eos, list) else [model_eos] if model_eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return ids
