"""The optimization keys shared by offline training (`drift train`) and the online arm (`drift online`).

`OptimConfig` declares them once, with the offline defaults; `OnlineOptim` is the same fields
with the online arm's preset (`ONLINE_PRESET`, the one place its defaults differ), so a
`TrainConfig` and an `OnlineConfig` built without these keys keep the results they always had.
In a `drift run` config, [train]'s optimization keys (`OPTIM_KEYS`) reach every arm, online
ones included; an online arm's own `online` table wins over them.

`check_optim` validates the keys once for both stages; `make_optimizer` and `add_lora` are the
one AdamW with its schedule and the one LoRA setup the online arm uses (the offline trainer
hands the same keys to the Hugging Face Trainer, which builds the same AdamW and schedule).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import SchedulerType, get_scheduler

from drift import DriftError
from drift.bounds import check_bounds, check_unit_interval
from drift.config import option


@dataclass
class OptimConfig:
    lr: float = option(1e-5, "peak learning rate (AdamW)")
    lr_scheduler: str = option("constant_with_warmup", "transformers scheduler name (constant, linear, cosine, ...)")
    warmup_ratio: float = option(0.1, "share of the optimizer steps with linear learning-rate warmup (0 <= r < 1)")
    weight_decay: float = option(0.1, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 disables)")
    max_length: int = option(1024, "tokens per conversation; longer ones lose prompt tokens from the left first")
    negative_nll_cap: float | None = option(5.0, "a negative-weight token (or one of negative advantage) whose NLL "
                                            "exceeds this many nats gets no more gradient (none: unbounded ascent)")
    dtype: Literal["auto", "float32", "bfloat16"] = option(
        "auto", "compute dtype; bfloat16: bf16 autocast over fp32 master weights and optimizer state; "
        "auto: bfloat16 where the device computes it fast (CUDA with bf16, CPUs with AMX or AVX512-BF16), else float32")
    lora: bool = option(False, "train a LoRA adapter (peft) instead of all weights")
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: int = option(32, "LoRA alpha")
    lora_dropout: float = option(0.05, "LoRA dropout")
    lora_targets: list[str] = option(["q_proj", "k_proj", "v_proj", "o_proj"], "modules LoRA adapts")


OPTIM_KEYS = tuple(f.name for f in dataclasses.fields(OptimConfig))

# The online arm's defaults where they differ from offline training's (a constant learning rate,
# as its recipe was tuned): the one place they are written.
ONLINE_PRESET: dict[str, Any] = {"lr": 1e-6, "lr_scheduler": "constant", "warmup_ratio": 0.0, "weight_decay": 0.01,
                                 "negative_nll_cap": None, "lora_dropout": 0.0}
# The online arm had a constant rate before it read the schedule keys: its records leave them
# out while they say so (`drift.config.option`'s `unrecorded`), and runs made before still resume.
_ONLINE_UNRECORDED = {"lr_scheduler": "constant", "warmup_ratio": 0.0}


def _preset(name: str, base: type, values: dict[str, Any], unrecorded: dict[str, Any]) -> type:
    """A dataclass subclass of `base` whose fields in `values` get those defaults, help text kept."""
    hints = typing.get_type_hints(base)
    fields = {f.name: f for f in dataclasses.fields(base)}
    new = [(k, hints[k], option(v, fields[k].metadata["help"], fields[k].metadata.get("result", True),
                                **({"unrecorded": unrecorded[k]} if k in unrecorded else {})))
           for k, v in values.items()]
    return dataclasses.make_dataclass(name, new, bases=(base,), namespace={"__module__": __name__})


OnlineOptim = _preset("OnlineOptim", OptimConfig, ONLINE_PRESET, _ONLINE_UNRECORDED)


def check_optim(cfg: OptimConfig) -> None:
    """One clear error for a bad optimization key (both stages; the bounds are `drift.bounds`')."""
    check_bounds(cfg, ("lr", "weight_decay", "max_grad_norm", "negative_nll_cap", "max_length", "lora_r", "lora_alpha"))
    check_unit_interval(cfg, "warmup_ratio", open_low=False)
    check_unit_interval(cfg, "lora_dropout", open_low=False)
    schedulers = [s.value for s in SchedulerType]
    if cfg.lr_scheduler not in schedulers:
        raise DriftError(f"config key 'lr_scheduler' must be one of {schedulers}, got {cfg.lr_scheduler!r}")


def add_lora(model: Any, cfg: OptimConfig) -> Any:
    """The model with a LoRA adapter (peft) of cfg's rank, alpha, dropout and target modules."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_targets, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as e:
        raise DriftError(f"LoRA: {e}") from None


def make_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig, steps: int) -> tuple[Any, Any]:
    """AdamW over `params` and its learning-rate schedule over `steps` optimizer steps (warmup:
    the first ceil(warmup_ratio * steps), as the Trainer counts them)."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=math.ceil(cfg.warmup_ratio * steps),
                              num_training_steps=steps)
    return optimizer, scheduler
