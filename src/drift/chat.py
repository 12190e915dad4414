"""The one chat-template render: training masks and every generation backend use it, so the
tokens a model is trained on and the tokens it is prompted with agree byte for byte."""

from __future__ import annotations

from typing import Any


def render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    """The conversation as text in the model's chat template (+ the assistant prompt if asked)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def render_ids(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = True) -> list[int]:
    """Token ids of `render` (the template's own special tokens, none added by the tokenizer)."""
    return tokenizer(render(tokenizer, messages, generation_prompt), add_special_tokens=False)["input_ids"]
