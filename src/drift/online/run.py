"""`drift online`: online multi-turn RL with group-relative advantages (the critic-free GRPO family).

DRIFT and this arm differ only in where the samples come from: here every iteration samples
`batch_prompts` problems x `n` conversations from the CURRENT policy, through the same rollout
engine, environment and return function, and takes an optimizer step on them through the same
loss (`drift.train.loss`) and masks (`turns = all`) as weighted SFT.

Each iteration:
  1. sample: the next `batch_prompts` training problems (epoch-shuffled by the seed), rolled out
     from the in-memory generation copy of the policy (each process rolls out its share);
  2. score: the return of every conversation (`drift.weights.trajectory_return`); with kl = ufo,
     minus 0.001 x the summed k1 estimate log pi - log pi_ref over its assistant tokens;
  3. advantages per group (`drift.online.advantages`): zero-spread groups skipped and counted,
     `keep_top` filter; the rows of the kept groups carry A_i as their weight;
  4. update (`Policy.update`): one optimizer step on the batch by default (on-policy: the ratio is
     exactly 1, no clipping needed), or PPO-clipped minibatches/epochs on stored log-probs; kl =
     matched adds beta x k3 to the loss;
  5. every `eval_every` iterations and after the last: greedy held-out evaluation through
     `drift eval`'s own path (the learning curve);
  6. the cost ledger entry, then the state (weights, optimizer, progress) saved atomically.
A kill at any point resumes with the same command from the last completed iteration: an
unfinished iteration is discarded and redone from its start with the same random streams (all of
them seeded from (seed, iteration)), so the result equals an uninterrupted run. A finished run
whose model files no longer match its summary's `files` (truncated, replaced) saves them again
from the state of its last iteration, on the same command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from drift import DriftError
from drift.config import build, derive_seed, to_dict
from drift.distributed import require_requested_engine
from drift.ledger import Cost, measure, parameter_count
from drift.online import state as saved
from drift.online.advantages import group_advantages, select_groups
from drift.online.config import OnlineConfig
from drift.online.policy import Policy
from drift.records import Trajectory, read_trajectories, return_inputs, write_json
from drift.rollout.config import sampling_record
from drift.rundir import (Lock, OnlineDir, damaged, ensure_writable, is_space_error, mismatch, read_record,
                          space_error, trained_record)
from drift.tasks import Problem, load_tasks
from drift.train.data import Example, RowError, tokenize_row, truncate
from drift.train.optim import add_lora
from drift.train.output import model_files
from drift.weights import trajectory_return

log = logging.getLogger(__name__)


def prompt_batch(problems: list[Problem], size: int, seed: int, iteration: int) -> list[Problem]:
    """The problems of one iteration: `size` distinct problems. Each epoch reshuffles the problems
    and cuts them into len // size batches; the len % size left over sit that epoch out (a
    different random few each epoch), so a batch never holds a problem twice."""
    if not 1 <= size <= len(problems):
        raise DriftError(f"batch_prompts = {size}: the task has {len(problems)} training problems")
    epoch, b = divmod(iteration, len(problems) // size)
    order = list(range(len(problems)))
    random.Random(derive_seed(seed, "epoch", epoch)).shuffle(order)
    return [problems[i] for i in order[b * size:(b + 1) * size]]


def stage_record(cfg: OnlineConfig, problems: list[Problem], model_record: dict[str, Any] | None) -> dict[str, Any]:
    """The online stage's record (`drift.rundir`)."""
    return sampling_record("online", cfg, problems, model_record)


def eval_config(cfg: OnlineConfig, model: str, output: Path) -> Any:
    """The held-out evaluation of the learning curve: the `eval` keys, on the training task and in this
    run's environment unless they say otherwise."""
    from drift.evaluate import EvalConfig, inherit_environment

    task = {"tasks": cfg.tasks, "task_seed": cfg.task_seed}
    return build(EvalConfig, {**task, **inherit_environment(to_dict(cfg), cfg.eval), "model": model,
                              "output": str(output), "resume": True}, "eval.")


def evaluation_count(cfg: OnlineConfig) -> int:
    """How many held-out evaluations the run makes: every eval_every iterations and after the last."""
    if not cfg.eval_every:
        return 1
    return cfg.iterations // cfg.eval_every + (cfg.iterations % cfg.eval_every != 0)


def announce_evaluations(cfg: OnlineConfig, ec: Any, problems: int) -> None:
    """Say at start what the learning curve's evaluations cost (the whole held-out split unless
    eval.num_problems bounds it: mc-arith's is 4,025 problems), and warn when they score the
    problems the arm trains on."""
    log.info("online: %d held-out evaluation(s), each of %d problems x %d sample(s), up to %d turns (%d "
             "conversations)%s", evaluation_count(cfg), problems, ec.n, ec.max_turns, problems * ec.n,
             "" if "num_problems" in cfg.eval else "; bound them with --eval '{\"num_problems\": N}'")
    if "all" in (ec.split, cfg.split) or (ec.split == cfg.split and ec.tasks == cfg.tasks):
        log.warning("online: the held-out evaluations (eval split %r) score problems the arm trains on (split %r): "
                    "its learning curve is not held out", ec.split, cfg.split)


def run_online(cfg: OnlineConfig) -> dict[str, Any]:
    """Run (or resume) the online arm; return its summary (also written to train_summary.json)."""
    from accelerate import Accelerator

    from drift.models import load_model_and_tokenizer, resolve_model
    from drift.rollout.config import task_spec

    if not cfg.output:
        raise DriftError("online needs an output directory (--output)")
    out = OnlineDir(ensure_writable(cfg.output))
    problems = load_tasks(task_spec(cfg))
    prompt_batch(problems, cfg.batch_prompts, cfg.seed, 0)  # B fits the task, before any work
    held_out_cfg = eval_config(cfg, cfg.model, out.path)
    held_out = load_tasks(task_spec(held_out_cfg))
    announce_evaluations(cfg, held_out_cfg, len(held_out))
    expected = stage_record(cfg, problems, trained_record(cfg.model))
    # accelerate keeps process-wide state: a Trainer that ran earlier in this process (an offline
    # arm of the same `drift run`) would otherwise impose its mixed precision on this model. Reset it
    # as transformers' TrainingArguments does; the policy runs its own autocast.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # several CPU processes join a gloo group
    require_requested_engine(accelerator, "the online arm")
    lock = Lock(out.path) if accelerator.is_main_process else None
    with lock or contextlib.nullcontext():
        previous = read_record(out.summary)
        if previous is not None and not previous.get("iterations_done") and previous.get("status") != "complete":
            # a start that failed before its first iteration finished: nothing to keep or to refuse
            log.info("online %s: the run there stopped before its first iteration; starting afresh", out.path)
            previous = None
        if previous is not None:
            differ = mismatch(previous, expected)
            if differ:
                raise DriftError(f"{out.path} holds an online run made with other settings ({'; '.join(differ)}): "
                                 "choose another --output")
            if previous.get("status") == "complete":
                harm = damaged(out.path, previous)
                if not harm:
                    log.info("online %s: already complete", out.path)
                    return previous
                # the state of the last iteration is kept: resuming from it saves the same model again
                log.warning("online %s: complete, but its files are damaged (%s): saving the final model again",
                            out.path, "; ".join(harm))
            elif not cfg.resume:
                raise DriftError(f"{out.path} holds an unfinished online run: pass --resume to go on with it, "
                                 "or choose another --output")
        path = resolve_model(cfg.model)
        model, tokenizer = load_model_and_tokenizer(path, dtype="float32", device=str(accelerator.device))
        model.train()
        if cfg.lora:
            model = add_lora(model, cfg)
        policy = Policy(cfg, model, tokenizer, accelerator, _gen_dtype(cfg))
        progress = _fresh_progress(parameter_count(policy.unwrapped))
        resume = saved.load(out) if previous is not None else None
        if resume is not None:
            policy.load(resume[0])
            progress = resume[1]
            log.info("online %s: resuming after iteration %d of %d", out.path, progress["iterations_done"], cfg.iterations)
        if accelerator.is_main_process:
            write_json(out.summary, {**expected, **_summary_fields(progress)})
        loop = _Loop(cfg, out, policy, accelerator, problems, held_out, progress, expected)
        try:
            loop.run()
            return loop.finish()
        except Exception as e:  # a full disk; the state's and the model's saves raise their own error types
            if not is_space_error(e, out.path):
                raise
            raise space_error(out.path, rerun="rerun the same command with --resume (it goes on from the last "
                                              "saved iteration)") from None


def _gen_dtype(cfg: OnlineConfig) -> torch.dtype:
    """Sampling and autocast dtype: bf16 where the device computes it fast (master weights stay float32)."""
    from drift.rollout.config import resolved_dtype

    return getattr(torch, resolved_dtype(cfg))


def _vllm(cfg: OnlineConfig) -> Any:
    """A vLLM engine for the base model with LoRA enabled at the adapter's rank (sync: `_Loop._sync`)."""
    from drift.models import resolve_model
    from drift.rollout.config import resolved_dtype
    from drift.rollout.vllm_backend import VLLMBackend

    return VLLMBackend(resolve_model(cfg.model), seed=cfg.seed, tensor_parallel_size=cfg.tensor_parallel_size,
                       gpu_memory_utilization=cfg.gpu_memory_utilization, max_model_len=cfg.max_model_len,
                       dtype=resolved_dtype(cfg), max_lora_rank=cfg.lora_r if cfg.lora else None, extra=cfg.vllm_args)


def _fresh_progress(parameters: int) -> dict[str, Any]:
    return {"iterations_done": 0, "cost": Cost(parameters=parameters).to_json(), "eval_cost": Cost().to_json(),
            "curve": [], "iterations": []}


def _summary_fields(progress: dict[str, Any]) -> dict[str, Any]:
    return {"cost": progress["cost"], "eval_cost": progress["eval_cost"], "curve": progress["curve"],
            "iterations_done": progress["iterations_done"], "iterations": progress["iterations"]}


class _Loop:
    """The iterations of one run (see the module docstring for the steps)."""

    def __init__(self, cfg: OnlineConfig, out: OnlineDir, policy: Policy, accelerator: Any, problems: list[Problem],
                 held_out: list[Problem], progress: dict[str, Any], expected: dict[str, Any]):
        self.cfg, self.out, self.policy, self.acc = cfg, out, policy, accelerator
        self.problems, self.held_out, self.progress, self.expected = problems, held_out, progress, expected
        self.tokenizer = policy.tokenizer
        self.vllm = _vllm(cfg) if cfg.backend == "vllm" else None

    def run(self) -> None:
        cfg, acc = self.cfg, self.acc
        backend = self._sync(self.progress["iterations_done"])
        for it in range(self.progress["iterations_done"], cfg.iterations):
            k = it + 1
            if acc.is_main_process:
                shutil.rmtree(self.out.iteration(k), ignore_errors=True)  # an unfinished iteration is redone
                shutil.rmtree(self.out.evaluation(k), ignore_errors=True)
            acc.wait_for_everyone()
            cost = Cost(parameters=self.progress["cost"]["parameters"])
            with measure(cost, str(acc.device)):
                began = time.perf_counter()
                trajs, rollout_cost = self._sample(it, backend)
                if it == self.progress["iterations_done"]:
                    self._estimate(len(trajs), time.perf_counter() - began)
                entry = self._learn(it, trajs, cost)
            cost = cost + dataclasses.replace(rollout_cost, wall_seconds=0.0, cpu_seconds=0.0, peak_memory_bytes=0)
            backend = self._sync(k)
            total = Cost.from_json(self.progress["cost"]) + cost
            entry["cost"] = cost.to_json()
            self.progress["cost"] = total.to_json()
            self.progress["iterations"].append(entry)
            if k == cfg.iterations or (cfg.eval_every and k % cfg.eval_every == 0):
                self._evaluate(k, backend, total)
            self.progress["iterations_done"] = k
            log.info("online iteration %d/%d: return %.3f, %d of %d groups trained (%d zero spread), loss %s",
                     k, cfg.iterations, entry["return_mean"], entry["groups_trained"], entry["groups"],
                     entry["groups_zero_spread"], entry["loss"])
            if acc.is_main_process and (k % cfg.save_every == 0 or k == cfg.iterations):
                saved.save(self.out, self.policy.state(), self.progress)
                write_json(self.out.summary, {**self.expected, **_summary_fields(self.progress)})
            acc.wait_for_everyone()

    def _estimate(self, conversations: int, seconds: float) -> None:
        """After the first iteration sampled: what one held-out evaluation will take at that pace."""
        ec = eval_config(self.cfg, self.cfg.model, self.out.path)
        todo = len(self.held_out) * ec.n
        log.info("online: iteration sampled %d conversations in %.1f s; each held-out evaluation (%d conversations) "
                 "will take about %.0f s at that pace", conversations, seconds, todo,
                 todo * seconds / max(conversations, 1))

    # step 1
    def _sync(self, k: int) -> Any:
        """The generation backend with the policy after k iterations: the hf backend over an
        in-memory copy of the live weights; vLLM serving the LoRA adapter saved after iteration k,
        or with lora = false reloading the full weights saved after it (only the latest kept)."""
        from drift.rollout.hf import HFBackend

        if self.vllm is None:
            # a fresh copy per iteration, used only to sample: its weights may be laid out once
            return HFBackend.from_model(self.policy.generator(), self.tokenizer, batch_size=self.cfg.batch_size,
                                        pack=True)
        if k > 0:
            path = self.out.adapter(k) if self.cfg.lora else self.out.sync_weights(k)
            root = path.parent
            if self.acc.is_main_process:
                if self.cfg.lora:
                    self.policy.unwrapped.save_pretrained(path)  # peft writes the adapter alone
                else:
                    self.policy.generator().save_pretrained(path)  # in the generation dtype
                    for old in root.iterdir():
                        if old != path:
                            shutil.rmtree(old)
            self.acc.wait_for_everyone()
            if self.cfg.lora:
                self.vllm.use_adapter(str(path), k)
            else:
                self.vllm.load_weights(str(path))
        return self.vllm

    def _sample(self, it: int, backend: Any) -> tuple[list[Trajectory], Cost]:
        from accelerate.utils import gather_object

        from drift.rollout.config import RolloutConfig
        from drift.rollout.engine import run_rollout

        cfg, acc = self.cfg, self.acc
        batch = prompt_batch(self.problems, cfg.batch_prompts, cfg.seed, it)
        mine = batch[acc.process_index::acc.num_processes]
        values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(RolloutConfig)}
        rcfg = RolloutConfig(**{**values, "output": str(self.out.iteration_rollout(it + 1, acc.process_index, acc.num_processes)),
                                "model": f"{cfg.output}#policy-after-{it}", "seed": derive_seed(cfg.seed, "rollout", it),
                                "resume": False})
        rows, cost = [], Cost()
        if mine:
            manifest = run_rollout(rcfg, problems=mine, backend=backend)
            rows = [t.to_json() for t in read_trajectories(rcfg.output)]
            cost = Cost.from_json(manifest["cost"])
        gathered = gather_object([(rows, cost.to_json())])
        order = {p.id: i for i, p in enumerate(batch)}
        trajs = sorted((Trajectory.from_json(r) for rs, _ in gathered for r in rs),
                       key=lambda t: (order[t.prompt_id], t.sample_idx))
        total = Cost()
        for _, c in gathered:
            total = total + Cost.from_json(c)
        return trajs, total

    # steps 2-4
    def _learn(self, it: int, trajs: list[Trajectory], cost: Cost) -> dict[str, Any]:
        cfg = self.cfg
        returns = [trajectory_return(return_inputs(t.to_json(), f"{t.prompt_id}#{t.sample_idx}"), cfg.returns)
                   for t in trajs]
        examples = [self._example(t) for t in trajs]
        unrenderable = [f"{t.prompt_id}#{t.sample_idx}" for t, e in zip(trajs, examples) if e is None]
        if unrenderable:
            log.warning("online iteration %d: %d conversation(s) left out of the update, their text does not "
                        "re-render to a token prefix (%s); their returns stay in the group baselines", it + 1,
                        len(unrenderable), ", ".join(unrenderable[:5]))
        kl_k1 = None
        if cfg.kl == "ufo":
            present = [i for i, e in enumerate(examples) if e is not None]
            now, n1 = self._logprobs([examples[i] for i in present])
            ref, n2 = self._logprobs([examples[i] for i in present], reference=True)
            cost.aux_forward_tokens += n1 + n2
            kl_k1 = [0.0] * len(examples)
            for i, x, y in zip(present, now, ref):
                kl_k1[i] = sum(a - b for a, b, m in zip(x, y, examples[i].mask) if m)
            returns = [r - cfg.kl_coefficient * k for r, k in zip(returns, kl_k1)]
        groups: dict[str, list[int]] = {}
        for i, t in enumerate(trajs):
            groups.setdefault(t.prompt_id, []).append(i)
        sel = select_groups({pid: [returns[i] for i in idx] for pid, idx in groups.items()}, cfg.keep_top)
        train: list[Example] = []
        for pid in sel.kept:
            idx = groups[pid]
            for i, a in zip(idx, group_advantages([returns[i] for i in idx], cfg.scale_by_std)):
                e = examples[i]
                if e is None:
                    continue
                train.append(Example(e.input_ids, e.mask, a, e.line))
        entry = {"iteration": it + 1, "conversations": len(trajs), "groups": len(groups),
                 "groups_trained": len(sel.kept), "groups_zero_spread": len(sel.zero_spread),
                 "groups_filtered": len(sel.filtered), "unrenderable": unrenderable,
                 "return_mean": sum(returns) / len(returns),
                 "solved_share": sum(t.success_turn is not None for t in trajs) / len(trajs),
                 "kl_k1_mean": sum(kl_k1) / len(kl_k1) if kl_k1 else None, "loss": None, "steps": 0}
        if not train:  # no group carries a signal: the weights stay exactly as they are
            return entry
        old = ref = None
        if cfg.ppo:
            old, n = self._logprobs(train)
            cost.aux_forward_tokens += n
        if cfg.kl == "matched":
            ref, n = self._logprobs(train, reference=True)
            cost.aux_forward_tokens += n
        torch.manual_seed(derive_seed(cfg.seed, "update", it))
        stats = self.policy.update(train, old, ref, derive_seed(cfg.seed, "order", it))
        cost.trained_tokens += int(self.acc.reduce(torch.tensor(stats.trained_tokens, device=self.acc.device),
                                                   reduction="sum"))
        cost.optimizer_steps += stats.steps
        entry.update(loss=stats.loss[-1], losses=stats.loss, grad_norm=stats.grad_norm, steps=stats.steps,
                     loss_tokens=stats.loss_tokens, clipped_tokens=stats.clipped, capped_tokens=stats.capped,
                     kl_k3_mean=stats.kl_sum / stats.loss_tokens if cfg.kl == "matched" and stats.loss_tokens else None)
        return entry

    def _example(self, t: Trajectory) -> Example | None:
        """The conversation as a training row; None when its text does not re-render to a token prefix
        (a message starting with spaces after SmolLM2's "assistant\n", which the tokenizer then merges
        with the newline): it cannot be trained on the tokens it was sampled as."""
        try:
            ids, mask, _ = tokenize_row(t.to_json(), self.tokenizer, "all")  # a turn cut at the limit: no end-of-turn target
            ids, mask, _, _ = truncate(ids, mask, self.cfg.max_length)
        except RowError as e:
            if e.reason == "template_not_prefix":
                return None
            raise DriftError(f"conversation {t.prompt_id}#{t.sample_idx}: {e}") from None
        return Example(ids, mask, 0.0, t.sample_idx)

    def _logprobs(self, examples: list[Example], reference: bool = False) -> tuple[list[list[float]], int]:
        """Auxiliary log-probs of every example, each process computing its share."""
        from accelerate.utils import gather_object

        acc = self.acc
        mine = list(range(acc.process_index, len(examples), acc.num_processes))
        values, tokens = self.policy.logprobs([examples[i] for i in mine], reference)
        gathered = gather_object([(mine, values, tokens)])
        out: list[list[float]] = [[] for _ in examples]
        for idx, vals, _ in gathered:
            for i, v in zip(idx, vals):
                out[i] = v
        return out, sum(n for _, _, n in gathered)

    # step 5
    def _evaluate(self, k: int, backend: Any, cost: Cost) -> None:
        from drift.evaluate import run_eval

        if self.acc.is_main_process:
            ec = eval_config(self.cfg, f"{self.cfg.output}#policy-after-{k}", self.out.evaluation(k))
            metrics = run_eval(ec, self.held_out, backend)
            self.progress["eval_cost"] = (Cost.from_json(self.progress["eval_cost"])
                                          + Cost.from_json(metrics.get("cost"))).to_json()
            self.progress["curve"].append({"iteration": k, "cost": cost.to_json(), "succ_at_k": metrics["succ_at_k"],
                                           "unique_ratio_multi_turn": metrics["unique_ratio_multi_turn"],
                                           "metrics": str(self.out.evaluation(k).relative_to(self.out.path))})
        self.acc.wait_for_everyone()

    def finish(self) -> dict[str, Any]:
        """Save the final model (adapter merged) where `drift eval` and vLLM load it; mark the run complete."""
        acc = self.acc
        summary = {**self.expected, "status": "complete", **_summary_fields(self.progress)}
        if acc.is_main_process:
            self.policy.generator(torch.float32).save_pretrained(self.out.path)
            self.tokenizer.save_pretrained(self.out.path)
            write_json(self.out.summary, {**summary, "files": model_files(self.out.path)})
        acc.wait_for_everyone()
        return summary
