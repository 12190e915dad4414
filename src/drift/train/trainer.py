"""`drift train`: importance-weighted fine-tuning on the Hugging Face Trainer.

Loss of one optimizer step over its global batch B (all micro-batches of the gradient
accumulation, all ranks), with loss_i the mean token NLL over the trained tokens of example i:
    normalize = mean:        L = sum_{i in B} w_i * loss_i / |B|        (the reference)
    normalize = weight_sum:  L = sum_{i in B} w_i * loss_i / sum_{i in B} w_i
    normalize = constant:    L = sum_{i in B} w_i * loss_i / (G * mean_j |w_j|)
G is the global batch size in rows (batch_size x grad_accum x processes) and the mean runs over
all training rows: one normalizer for the whole run, the expected weight sum of a global batch.
weight_sum scales every batch to full strength however little weight it holds (length grouping
puts the longest rows, mostly failures with low weights, together); constant keeps a batch of
low-weight rows a small step. Every normalizer is counted over the whole global batch before its
first forward pass, so batch 1 x accumulation 4 gives the same gradient as batch 4 x
accumulation 1, and N ranks the same as one process. With turns=all an example is a whole
conversation and loss_i the mean over all its trained tokens.

min_weight drops rows with |w| < min_weight before training. The default 1e-3: DRIFT weights
average 1 per prompt group, so such a row pulls less than 0.1% of an average row, while with
beta = 0.1 a failure in a group that also holds a success gets ~5e-5 and would cost a full
forward and backward pass. To keep the reference objective, the kept weights are multiplied by
rows kept / rows valid (train_summary.json: data.weight_scale): under mean the expected loss is
then the reference's, less the dropped rows' terms (without it, |B| would count kept rows only
and the effective learning rate would grow by 1 / share kept); under weight_sum and constant the
scale cancels.

Rows that `drift weights` marked pruned (`prune`: the smallest rows of a group, summing to at
most that share of the group's weight) are not trained but stay in every normalizer: |B| counts
them, sum w includes their weights, the mean |w| of constant runs over them, and the global
batches (so the number of steps and the learning-rate schedule) are those of the unpruned run.
A step's loss therefore differs from the unpruned run's by the pruned rows' terms alone,
sum_{pruned i in B} w_i * loss_i / normalizer. Unlike min_weight, nothing is rescaled.

Negative weights (swift) push the probability of a token down without bound. With
negative_nll_cap a negative-weight token whose NLL is already past the cap gets no more gradient
(train_summary.json: capped_tokens counts them over the run).

What a run leaves in its output, and how a resume is checked: `drift.train.output`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import logging
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader
from transformers import Trainer

from drift import DriftError
from drift.config import option
from drift.distributed import require_requested_engine
from drift.hardware import default_device, resolve_dtype
from drift.ledger import Cost, measure, parameter_count
from drift.records import write_json
from drift.rundir import (Lock, TrainDir, config_record, damaged, ensure_writable, is_space_error, read_record,
                          space_error, trained_record, weights_record)
from drift.train.data import Batching, GlobalBatchSampler, collate, load_examples, rows_record
from drift.train.loss import loss_targets, weighted_nll_sum
from drift.train.optim import OptimConfig, add_lora, check_optim
from drift.train.output import check_space, model_files, resume_checkpoint, space_needed, start_output
from drift.train.progress import COUNTERS, Progress

log = logging.getLogger(__name__)


@dataclass
class TrainConfig(OptimConfig):
    """`drift train`'s keys; the optimization keys (lr, schedule, weight decay, clipping, max_length, the
    NLL cap, dtype, LoRA) are `drift.train.optim.OptimConfig`'s, with its defaults."""

    model: str = option("smollm2-135m", "model to fine-tune (the reference policy): hub name, local directory "
                        "or smollm2-135m")
    data: str = option("", "weighted JSONL from `drift weights` (rows with messages and weight), or a directory", result=False)
    output: str = option("runs/train", "output directory: save_pretrained model + tokenizer, train_summary.json", result=False)
    turns: Literal["last", "all"] = option("last", "last: train the last assistant message (the reference); "
                                           "all: every assistant message of the conversation in one pass")
    normalize: Literal["mean", "weight_sum", "constant"] = option(
        "mean", "mean: sum_i w_i*loss_i / rows of the global batch (the reference); weight_sum: ... / its sum_i w_i; "
        "constant: ... / (global batch size x mean |w| of the data), the same for every step")
    min_weight: float = option(1e-3, "drop rows with |weight| below this before training (0 keeps all)")
    allow_negative_weights: bool = option(False, "admit negative weights (standardized ones such as swift's)")
    skip_bad_rows: bool = option(False, "skip and count bad rows instead of stopping at the first")
    batching: Literal["group", "pack", "random"] = option(
        "group", "group: micro-batches of similar length; pack: padding-free rows (best with flash attention); "
        "random: the naive recipe")
    epochs: float = option(2.0, "passes over the data")
    max_steps: int = option(-1, "stop after this many optimizer steps (>= 1; -1: run all epochs)")
    batch_size: int = option(8, "examples per micro-batch per process")
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step")
    seed: int = option(0, "seed for initialization and data order")
    merge_lora: bool = option(False, "also save the base model with the adapter merged in output/merged")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass to save memory", result=False)
    attn_implementation: str | None = option(None, "attention kernel (sdpa, eager, flash_attention_2; "
                                             "default: the transformers default)", result=False)
    report_to: Literal["none", "tensorboard", "wandb"] = option("none", "where to log (wandb runs offline "
                                                                "unless WANDB_MODE says otherwise)", result=False)
    logging_steps: int = option(10, "log the loss every this many steps", result=False)
    save_steps: int = option(0, "save a resumable checkpoint (with optimizer state) every this many steps; "
                             "0: none", result=False)
    save_total_limit: int = option(2, "checkpoints kept", result=False)
    resume_from_checkpoint: str | None = option(None, "checkpoint directory to resume from, or 'latest'", result=False)


class WeightedTrainer(Trainer):
    """Trainer with the weighted loss, the global-batch normalizer and drift's batch sampler."""

    loss_is_scaled_for_ga = True  # compute_loss already divides by the global-batch normalizer

    def __init__(self, *args: Any, normalize: str = "mean", batching: Batching = "group",
                 nll_cap: float | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.normalize, self.batching, self.nll_cap = normalize, batching, nll_cap
        self.counts = torch.zeros(len(COUNTERS), dtype=torch.float64)  # [COUNTERS] of this process, this run
        self.loss_sum = torch.zeros((), dtype=torch.float64)  # sum of the step losses of this process, this run
        a = self.args
        rows = a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size
        self.constant = rows * statistics.fmean(abs(e.weight) for e in self.train_dataset)

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The step's loss, also added to `loss_sum` (the Trainer's own sum covers only the steps
        since a resume; `Progress` carries this one across resumes)."""
        loss = super().training_step(*args, **kwargs)
        self.loss_sum = self.loss_sum.to(loss.device) + loss.detach().double()
        return loss

    def get_train_dataloader(self) -> DataLoader:
        args = self.args
        sampler = GlobalBatchSampler([len(e.input_ids) for e in self.train_dataset], args.per_device_train_batch_size,
                                     args.gradient_accumulation_steps, args.world_size, self.batching, args.seed)
        pad_id = self.processing_class.pad_token_id
        pack = self.batching == "pack"
        loader = DataLoader(self.train_dataset, batch_sampler=sampler, num_workers=0,
                            collate_fn=lambda examples: collate(examples, pad_id, pack))
        return self.accelerator.prepare(loader)

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """The step's micro-batches and this rank's share of the global normalizer.

        Gradients are averaged over ranks, so each rank divides by normalizer / world_size.
        """
        batches = list(itertools.islice(epoch_iterator, num_batches))
        if not batches:
            return batches, None
        for b in batches:
            real = b["attention_mask"].sum() if "attention_mask" in b else b["input_ids"].numel()
            self.counts[:3] += torch.tensor([float((b["labels"] != -100).sum()), float(real),
                                             float(b["input_ids"].numel())], dtype=torch.float64)
        return batches, self.normalizer(batches, device) / self.args.world_size

    def normalizer(self, batches: list[dict[str, torch.Tensor]], device: torch.device) -> torch.Tensor:
        """The global batch's normalizer (see the module docstring); a collective unless constant."""
        if self.normalize == "constant":
            return torch.tensor(self.constant, device=device)
        key = "weight_total" if self.normalize == "weight_sum" else "rows"  # pruned rows included (module docstring)
        local = torch.stack([b[key] for b in batches]).sum().to(device)
        total = self.accelerator.reduce(local.float(), reduction="sum")
        return torch.where(total > 0, total, torch.ones_like(total))  # all-zero weights: loss 0, not NaN

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if "weight" not in inputs or "token_weight" not in inputs:
            raise RuntimeError("batch without the weight column: training would silently be unweighted")
        inputs = dict(inputs)
        labels, token_weight = inputs.pop("labels"), inputs.pop("token_weight")
        rows, weight_total = inputs.pop("rows"), inputs.pop("weight_total")
        inputs.pop("weight")
        keep, targets, weights = loss_targets(labels, token_weight)
        outputs = model(**inputs, logits_to_keep=keep)
        total, stats = weighted_nll_sum(outputs.logits, targets, weights, self.nll_cap)
        self.counts[3] += stats.capped
        if num_items_in_batch is None:  # outside the training loop: normalize over this batch
            num_items_in_batch = {"weight_sum": weight_total, "constant": self.constant}.get(self.normalize, rows)
        loss = total / num_items_in_batch
        return (loss, outputs) if return_outputs else loss


def _check(cfg: TrainConfig) -> None:
    if not cfg.data:
        raise DriftError("train: set data (a weighted JSONL from `drift weights`)")
    _check_numbers(cfg)
    if cfg.normalize == "weight_sum" and cfg.allow_negative_weights:
        raise DriftError("normalize=weight_sum needs non-negative weights; use normalize=mean or constant with "
                         "allow_negative_weights")
    if cfg.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise DriftError("report_to=wandb needs the wandb package (pip install wandb)")
    if cfg.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise DriftError("report_to=tensorboard needs the tensorboard package (pip install tensorboard)")
    if cfg.merge_lora and not cfg.lora:
        raise DriftError("merge_lora needs lora")


def _check_numbers(cfg: TrainConfig) -> None:
    check_optim(cfg)
    for name in ("batch_size", "grad_accum", "logging_steps"):
        if getattr(cfg, name) < 1:
            raise DriftError(f"config key '{name}' must be >= 1, got {getattr(cfg, name)}")
    for name in ("epochs", "min_weight"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0):
            raise DriftError(f"config key '{name}' must be a finite number >= 0, got {value}")
    if cfg.max_steps < 1 and cfg.max_steps != -1:
        raise DriftError(f"config key 'max_steps' must be -1 (run all epochs) or >= 1, got {cfg.max_steps}")
    if cfg.epochs == 0 and cfg.max_steps == -1:
        raise DriftError("config key 'epochs' must be > 0 (or set max_steps), got 0")


def _load_model(path: str, cfg: TrainConfig) -> Any:
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    except Exception as e:  # transformers raises many types for a bad checkpoint
        raise DriftError(f"cannot load model {cfg.model!r}: {' '.join(str(e).split())[:300]}") from None
    if cfg.lora:
        model = add_lora(model, cfg)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _training_args(cfg: TrainConfig) -> Any:
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    bf16 = resolve_dtype(cfg.dtype, default_device()) == "bfloat16"
    if cfg.report_to == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")
    return TrainingArguments(
        output_dir=cfg.output, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps, warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler, max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, bf16=bf16,
        report_to=cfg.report_to, logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps > 0 else "no", save_steps=max(cfg.save_steps, 1),
        save_total_limit=cfg.save_total_limit, remove_unused_columns=False, dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        use_cpu=not cuda)


def _save_merged(base_path: str, output: Path, tokenizer: Any) -> None:
    """Reload the base model, merge the saved adapter into it, save to output/merged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(output)).merge_and_unload()
    merged.save_pretrained(TrainDir(output).merged)
    tokenizer.save_pretrained(TrainDir(output).merged)


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    """Weighted fine-tuning; returns (and writes to output/train_summary.json) a summary.

    1. check the config and that the output is writable; process 0 locks the output for the run
    2. find the checkpoint to resume from; refuse one made with other settings
    3. load the tokenizer and turn the weighted rows into examples (masks, truncation, min_weight)
    4. load the model (full weights or a LoRA adapter)
    5. mark the output running (no model files of an earlier run left), train with WeightedTrainer
    6. save model + tokenizer (+ merged model), write the summary (status complete)
    Bad input fails in steps 1-4, before anything in the output is changed.
    """
    # step 1
    _check(cfg)
    out = ensure_writable(cfg.output)
    # Every process of `accelerate launch` runs this; one lock per output is enough, taken by the
    # process that writes. A second job into the same output fails there, and the launcher ends
    # the job's other processes.
    args = _training_args(cfg)
    with Lock(out) if args.process_index == 0 else contextlib.nullcontext():
        return _train(cfg, args, out)


def _train(cfg: TrainConfig, args: Any, out: Path) -> dict[str, Any]:
    from drift.models import load_tokenizer, resolve_model

    cost, started = Cost(), (time.perf_counter(), time.process_time())
    with measure(cost, str(args.device)):
        # step 2
        rows = read_record(weights_record(cfg.data)) or rows_record(cfg.data)
        if harm := damaged(Path(cfg.data).parent, rows):
            raise DriftError(f"{cfg.data}: damaged weighted rows: {'; '.join(harm)}; write them again with drift weights")
        rec = stage_record(cfg, rows, trained_record(cfg.model))
        checkpoint, carried = resume_checkpoint(cfg.resume_from_checkpoint, out, rec)
        # step 3
        path = resolve_model(cfg.model)
        tokenizer = load_tokenizer(path)
        if not tokenizer.chat_template:
            raise DriftError(f"model {cfg.model!r} has no chat template: masks are built from it")
        examples, stats = load_examples(cfg.data, tokenizer, cfg.turns, cfg.max_length, cfg.min_weight,
                                        cfg.skip_bad_rows, cfg.allow_negative_weights)
        log.info("train: %d rows used of %d; %d pruned (%.3g%% of the weight, in the normalizer); %d dropped below "
                 "min_weight %g (%.3g%% of the weight, kept weights x %.4g); skipped %s", stats.rows_used,
                 stats.rows_read, stats.pruned, 100 * stats.weight_pruned / stats.weight_total if stats.weight_total
                 else 0.0, stats.dropped_min_weight, cfg.min_weight, 100 * stats.weight_share_dropped,
                 stats.weight_scale, stats.skipped or "none")
        if stats.weight_total - stats.weight_dropped - stats.weight_pruned <= 0:
            raise DriftError(f"{cfg.data}: every kept row has weight 0: nothing to learn")
        # step 4 (after the arguments: under DeepSpeed ZeRO-3 they make from_pretrained load sharded)
        model = _load_model(path, cfg)
        needed = space_needed(model, path, max(cfg.save_total_limit, 1) if cfg.save_steps > 0 else 0, cfg.lora,
                              cfg.merge_lora)
        check_space(out, needed, fresh=checkpoint is None)
        # step 5
        trainer = WeightedTrainer(model=model, args=args, train_dataset=examples, processing_class=tokenizer,
                                  normalize=cfg.normalize, batching=cfg.batching, nll_cap=cfg.negative_nll_cap)
        require_requested_engine(trainer.accelerator, "drift train")
        progress = Progress(trainer, rec, carried, started, parameter_count(model))
        trainer.add_callback(progress)
        if trainer.is_world_process_zero():
            start_output(out, {**rec, "config": asdict(cfg)}, fresh=checkpoint is None)
        try:
            result = trainer.train(resume_from_checkpoint=checkpoint and str(checkpoint))
            counters = progress.counters()
            # step 6
            trainer.save_model(str(out))
            if trainer.is_world_process_zero():
                tokenizer.save_pretrained(out)
                if cfg.merge_lora:
                    _save_merged(path, out, tokenizer)
        except Exception as e:  # a checkpoint's or the model's save; safetensors and torch.save have their own errors
            if not is_space_error(e, out, sum(needed.values())):
                raise
            saved = bool(TrainDir(out).complete_checkpoints())
            rerun = ("rerun with --resume-from-checkpoint latest (drift run does so itself)" if saved
                     else "rerun the same command")
            raise space_error(out, sum(needed.values()), rerun) from None
    summary = {**rec, "status": "complete", **_summary(cfg, stats, trainer, result, counters),
               "resumed_from": checkpoint and str(checkpoint), "cost": progress.cost(cost, counters).to_json()}
    if trainer.is_world_process_zero():
        write_json(TrainDir(out).summary, {**summary, "files": model_files(out)})
    trainer.accelerator.wait_for_everyone()  # no rank leaves (and drops its connections) while another writes
    log.info("train: %d steps, final loss %s, %.0f tokens/s, saved to %s", summary["steps"], summary["final_loss"],
             summary["tokens_per_second"], out)
    return summary


def _summary(cfg: TrainConfig, stats: Any, trainer: WeightedTrainer, result: Any,
             counters: dict[str, float]) -> dict[str, Any]:
    history = [{k: h[k] for k in ("step", "loss", "grad_norm", "learning_rate") if k in h}
               for h in trainer.state.log_history if "loss" in h]
    seconds, trained, real, slots = (counters[k] for k in ("seconds", "trained_tokens", "tokens", "slot_tokens"))
    return {
        "config": asdict(cfg), "data": {**asdict(stats), "weight_share_dropped": stats.weight_share_dropped},
        "steps": trainer.state.global_step, "world_size": trainer.args.world_size,
        "hardware": {"device": trainer.args.device.type, "dtype": "bfloat16" if trainer.args.bf16 else "float32"},
        "distributed_type": trainer.accelerator.distributed_type.value,
        "constant_normalizer": trainer.constant if cfg.normalize == "constant" else None,
        # the mean step loss over the whole run, resumed or not (the Trainer's covers this process's steps)
        "train_loss": counters["loss_sum"] / max(trainer.state.global_step, 1),
        "final_loss": history[-1]["loss"] if history else result.training_loss,
        "history": history,
        "seconds": seconds, "trained_tokens": trained, "tokens": real, "capped_tokens": counters["capped_tokens"],
        "padding_share": 1 - real / slots if slots else 0.0,
        "tokens_per_second": real / seconds if seconds else 0.0,
        "trained_tokens_per_second": trained / seconds if seconds else 0.0,
    }


def stage_record(cfg: TrainConfig, weights_record: dict[str, Any] | None,
                 model_record: dict[str, Any] | None) -> dict[str, Any]:
    """The train stage's record (`drift.rundir`): its settings (the dtype resolved; a starting model
    that drift trained named by its record), and the weighted rows it trained on."""
    return config_record("train", cfg, weights_record, cfg.data, model_record=model_record,
                         dtype=resolve_dtype(cfg.dtype, default_device()))
