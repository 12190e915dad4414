"""Shared fixtures: a local byte-level tokenizer with chat templates and tiny random models.

Nothing is downloaded: HF_HUB_OFFLINE=1 makes a missing file fail fast.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models gain nothing from intra-op threads, and oversubscribed cores make them 10x slower.
torch.set_num_threads(1)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

SPECIALS = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]


def make_tokenizer(family: str = "chatml"):
    """A byte-level tokenizer (any text encodes) with the chat template of `family`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    eos = "<|im_end|>" if family == "chatml" else "<|eot_id|>"
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos, pad_token="<|pad|>",
                                  additional_special_tokens=SPECIALS)
    tok.chat_template = CHATML_TEMPLATE if family == "chatml" else LLAMA3_TEMPLATE
    return tok


def make_model(tokenizer, arch: str = "llama", seed: int = 0):
    """A 2-layer random model sized for the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=None, tie_word_embeddings=True)
    cfg = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    return AutoModelForCausalLM.from_config(cfg)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer("chatml")


@pytest.fixture(scope="session")
def llama3_tokenizer():
    return make_tokenizer("llama3")


def save_tiny_model(directory, tokenizer):
    """A tiny random Llama + `tokenizer` saved to `directory`, loadable with from_pretrained."""
    model = make_model(tokenizer)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny random Llama + ChatML tokenizer, loadable with from_pretrained."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tiny_tokenizer)


@pytest.fixture(autouse=True)
def cpu_without_fast_bf16(monkeypatch):
    """dtype auto resolves to float32 in every test, whatever CPU runs them: literal expectations
    are fp32 numbers (tests that want bf16 ask for it; test_hardware mocks the report itself)."""
    from drift import hardware

    monkeypatch.setattr(hardware, "_read_cpuinfo", lambda: "")
