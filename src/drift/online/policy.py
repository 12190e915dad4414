"""The online arm's policy: one model and one optimizer for the whole run.

- `generator()` is the in-memory copy the rollout samples from (adapter merged, in the
  generation dtype, eval mode): the hf backend's "weight sync" is this copy, no save and reload.
- `logprobs()` runs the auxiliary forward passes (the sampling policy's log-probabilities for
  PPO ratios, the reference's for the KL): per example, log p(token t | tokens < t) at each
  trained position t.
- `update()` is one iteration's optimizer work (AdamW and its learning-rate schedule from
  `drift.train.optim`, constant by default) through the one loss of `drift.train.loss`:
  `minibatches` steps per epoch, `update_epochs` epochs, micro-batches accumulated, the
  normalizer counted over the global (all-process) minibatch.
The reference for the KL is the base model: with LoRA the same model with its adapter disabled,
otherwise a frozen copy made at the start.
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from drift.online.config import OnlineConfig
from drift.train.data import Example, collate
from drift.train.loss import LossStats, loss_targets, policy_loss_sum, row_share, token_logprobs
from drift.train.optim import make_optimizer

PerToken = list[float]  # aligned with an example's input_ids; the value at t belongs to token t


@dataclass
class UpdateStats:
    steps: int = 0
    trained_tokens: int = 0  # every real token through forward and backward (context included)
    loss: list[float] = field(default_factory=list)  # per optimizer step: the normalized loss
    grad_norm: list[float] = field(default_factory=list)
    loss_tokens: int = 0  # tokens in the loss
    clipped: int = 0
    capped: int = 0
    kl_sum: float = 0.0


class Policy:
    def __init__(self, cfg: OnlineConfig, model: Any, tokenizer: Any, accelerator: Any, gen_dtype: torch.dtype):
        self.cfg, self.tokenizer, self.accelerator, self.gen_dtype = cfg, tokenizer, accelerator, gen_dtype
        self.pad_id = tokenizer.pad_token_id
        self.reference = None
        if cfg.kl != "none" and not cfg.lora:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer, self.scheduler = make_optimizer(params, cfg, cfg.iterations * cfg.update_epochs * cfg.minibatches)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)  # the schedule steps once per step, here
        if self.reference is not None:
            self.reference = self.reference.to(accelerator.device)

    def autocast(self) -> Any:
        """bf16 autocast over the float32 master weights where the generation dtype is bf16."""
        return torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16,
                              enabled=self.gen_dtype == torch.bfloat16)

    @property
    def unwrapped(self) -> Any:
        return self.accelerator.unwrap_model(self.model)

    def generator(self, dtype: torch.dtype | None = None) -> Any:
        """A copy of the current policy for sampling (or saving): adapter merged, in the generation
        dtype (or `dtype`), eval mode."""
        model = copy.deepcopy(self.unwrapped)
        if self.cfg.lora:
            model = model.merge_and_unload()
        return model.to(dtype or self.gen_dtype).eval().requires_grad_(False)

    # --- auxiliary forward passes ------------------------------------------------------------
    @torch.no_grad()
    def logprobs(self, examples: Sequence[Example], reference: bool = False) -> tuple[list[PerToken], int]:
        """Per example, log-probabilities at its trained positions (0 elsewhere); and the tokens run."""
        out: list[PerToken] = []
        tokens = 0
        model = self.unwrapped if not reference else (self.reference or self.unwrapped)
        adapter_off = self.unwrapped.disable_adapter() if reference and self.cfg.lora else contextlib.nullcontext()
        was_training = model.training
        model.eval()
        with adapter_off:
            for chunk in _chunks(list(examples), self.cfg.micro_batch_size):
                batch = collate(chunk, self.pad_id)
                keep, targets, _ = loss_targets(batch["labels"], batch["token_weight"])
                with self.autocast():
                    logits = model(input_ids=batch["input_ids"].to(self.accelerator.device),
                                   attention_mask=batch["attention_mask"].to(self.accelerator.device),
                                   logits_to_keep=keep.to(self.accelerator.device)).logits
                lp = token_logprobs(logits, targets.to(logits.device)).cpu()
                full = torch.zeros(batch["input_ids"].shape, dtype=torch.float32)
                full[:, 1:][:, keep] = lp
                out += [full[r, : len(e.input_ids)].tolist() for r, e in enumerate(chunk)]
                tokens += sum(len(e.input_ids) for e in chunk)
        model.train(was_training)
        return out, tokens

    # --- the update ----------------------------------------------------------------------------
    def update(self, examples: list[Example], old: list[PerToken] | None, ref: list[PerToken] | None,
               seed: int) -> UpdateStats:
        """One iteration's optimizer steps on `examples` (weights = advantages, already scaled)."""
        cfg, acc = self.cfg, self.accelerator
        stats = UpdateStats()
        self.model.train()
        index = list(range(len(examples)))
        for epoch in range(cfg.update_epochs):
            order = index[:]
            if cfg.ppo:
                random.Random(f"{seed}:{epoch}").shuffle(order)
            for mb in _split(order, cfg.minibatches):
                if mb:
                    self._step([examples[i] for i in mb], [old[i] for i in mb] if old else None,
                               [ref[i] for i in mb] if ref else None, stats)
        return stats

    def _step(self, examples: list[Example], old: list[PerToken] | None, ref: list[PerToken] | None,
              stats: UpdateStats) -> None:
        cfg, acc = self.cfg, self.accelerator
        world, rank = acc.num_processes, acc.process_index
        mine = list(range(rank, len(examples), world))  # this process's share of the global minibatch
        normalizer = sum(row_share(cfg.normalize, e.weight, e.mask) for e in examples)
        chunks = _chunks(sorted(mine, key=lambda i: len(examples[i].input_ids)), cfg.micro_batch_size) or [[]]
        step_loss = torch.zeros((), dtype=torch.float64)
        for k, chunk in enumerate(chunks):
            sync = contextlib.nullcontext() if k == len(chunks) - 1 else acc.no_sync(self.model)
            with sync:
                if chunk:
                    total, ls = self._loss([examples[i] for i in chunk], [old[i] for i in chunk] if old else None,
                                           [ref[i] for i in chunk] if ref else None)
                    stats.trained_tokens += sum(len(examples[i].input_ids) for i in chunk)
                    _add(stats, ls)
                else:  # no rows here: still take part in the gradient all-reduce
                    total = sum(p.sum() * 0.0 for p in self.model.parameters() if p.requires_grad)
                loss = total / normalizer
                acc.backward(loss * world)  # processes average gradients; the normalizer is already global
                step_loss += float(loss.detach())
        norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        stats.steps += 1
        stats.loss.append(float(acc.reduce(step_loss.to(acc.device), reduction="sum")))
        stats.grad_norm.append(float(norm) if norm is not None else float("nan"))

    def _loss(self, chunk: list[Example], old: list[PerToken] | None,
              ref: list[PerToken] | None) -> tuple[torch.Tensor, LossStats]:
        cfg, dev = self.cfg, self.accelerator.device
        batch = collate(chunk, self.pad_id, normalize=cfg.normalize)
        keep, targets, weights = loss_targets(batch["labels"], batch["token_weight"])
        mass = None
        if cfg.normalize == "sequences":  # 1 / n_i per trained token: a per-conversation mean of the KL too
            ones = collate([Example(e.input_ids, e.mask, 1.0, e.line) for e in chunk], self.pad_id,
                           normalize=cfg.normalize)
            mass = ones["token_weight"][:, 1:][:, keep].to(dev)
        with self.autocast():
            logits = self.model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                                logits_to_keep=keep.to(dev)).logits
        targets = targets.to(dev)
        logp = token_logprobs(logits, targets)
        return policy_loss_sum(logp, weights.to(dev), targets != -100,
                               old_logp=_at(old, batch, keep, dev) if cfg.ppo else None,
                               clip=(cfg.clip_low, cfg.clip_high),
                               ref_logp=_at(ref, batch, keep, dev), kl_coef=cfg.kl_coefficient if cfg.kl == "matched" else 0.0,
                               kl_mass=mass, nll_cap=cfg.negative_nll_cap)

    # --- state -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What a resumed run needs: the trainable weights and the optimizer's state."""
        trainable = {n for n, p in self.unwrapped.named_parameters() if p.requires_grad}
        weights = {k: v.detach().cpu() for k, v in self.unwrapped.state_dict().items()
                   if not self.cfg.lora or k in trainable or "lora_" in k}
        return {"model": weights, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load(self, state: dict[str, Any]) -> None:
        missing, unexpected = self.unwrapped.load_state_dict(state["model"], strict=not self.cfg.lora)
        if unexpected:
            raise RuntimeError(f"state holds unknown weights: {unexpected[:3]}")
        self.optimizer.load_state_dict(state["optimizer"])
        if "scheduler" in state:  # a state saved before the schedule was kept had a constant rate
            self.scheduler.load_state_dict(state["scheduler"])


def _at(values: list[PerToken] | None, batch: dict[str, torch.Tensor], keep: torch.Tensor,
        device: Any) -> torch.Tensor | None:
    """Per-token values of a padded batch at the loss positions: [B, K]."""
    if values is None:
        return None
    full = torch.zeros(batch["input_ids"].shape, dtype=torch.float32)
    for r, v in enumerate(values):
        full[r, : len(v)] = torch.tensor(v)
    return full[:, 1:][:, keep].to(device)


def _add(stats: UpdateStats, ls: LossStats) -> None:
    stats.loss_tokens += ls.tokens
    stats.clipped += ls.clipped
    stats.capped += ls.capped
    stats.kl_sum += ls.kl_sum


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _split(items: list, parts: int) -> Iterator[list]:
    """`parts` consecutive slices of nearly equal size."""
    n = len(items)
    for k in range(parts):
        yield items[k * n // parts:(k + 1) * n // parts]
