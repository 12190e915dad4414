"""The online arm: advantages and the loss on hand-computed groups, KL presets, no-signal
iterations, resume after SIGKILL, and two processes against one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from online_task import write_tasks
from transformers import AutoModelForCausalLM

from drift import DriftError
from drift.config import build
from drift.online.advantages import group_advantages, select_groups, spread
from drift.online.config import OnlineConfig
from drift.online.run import prompt_batch, run_online
from drift.tasks import Problem

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


def test_group_advantages_by_hand():
    assert group_advantages([1.0, 0.0, 0.0, 0.9]) == pytest.approx([0.525, -0.475, -0.475, 0.425])
    # population std of [1, 0, 0, 0.9] = sqrt(((.525)^2 + 2 (.475)^2 + (.425)^2) / 4) = 0.47631...
    std = ((0.525**2 + 2 * 0.475**2 + 0.425**2) / 4) ** 0.5
    assert spread([1.0, 0.0, 0.0, 0.9]) == pytest.approx(std)
    assert group_advantages([1.0, 0.0, 0.0, 0.9], std=True) == pytest.approx(
        [0.525 / (std + 1e-6), -0.475 / (std + 1e-6), -0.475 / (std + 1e-6), 0.425 / (std + 1e-6)])
    assert group_advantages([0.5, 0.5]) == [0.0, 0.0]


def test_select_groups_skips_zero_spread_and_keeps_the_widest():
    groups = {"a": [0, 0, 0], "b": [1, 0, 0], "c": [1, 0.9, 0.81], "d": [1, 1, 0], "e": [-0.5, -0.5, -0.5]}
    sel = select_groups(groups)
    assert sel.kept == ["b", "c", "d"] and sel.zero_spread == ["a", "e"] and sel.filtered == []
    top = select_groups(groups, keep_top=0.4)  # ceil(0.4 * 5) = 2 groups: spreads b = d = 0.471 > c = 0.078
    assert top.kept == ["b", "d"] and top.filtered == ["c"]


def test_prompt_batches_are_distinct_problems_and_cover_each_epoch_once():
    """5 problems, batches of 2: two batches per epoch, one problem sits each epoch out. A batch
    crossing an epoch's end could hold one problem twice (two groups under one id)."""
    problems = [Problem(id=f"p{i}", question="q", answer="a") for i in range(5)]
    batches = [[p.id for p in prompt_batch(problems, 2, 0, it)] for it in range(40)]
    assert all(len(set(b)) == 2 for b in batches)
    epochs = [batches[i] + batches[i + 1] for i in range(0, 40, 2)]
    assert all(len(set(e)) == 4 for e in epochs)
    assert len({tuple(sorted(e)) for e in epochs}) > 1  # a different problem sits out across epochs
    assert prompt_batch(problems, 2, 0, 3) == prompt_batch(problems, 2, 0, 3)
    with pytest.raises(DriftError, match="batch_prompts = 6: the task has 5 training problems"):
        prompt_batch(problems, 6, 0, 0)


def config(tmp_path, model_dir, **over):
    tasks = write_tasks(tmp_path / "tasks.jsonl", 4)
    held_out = write_tasks(tmp_path / "held_out.jsonl", 3)
    data = dict(model=str(model_dir), tasks=tasks, output=str(tmp_path / "online"), n=4, batch_prompts=2,
                max_turns=2, max_new_tokens=3, iterations=2, lr=1e-2, eval_every=0, batch_size=8,
                eval={"tasks": held_out, "max_new_tokens": 3}, resume=True)
    return build(OnlineConfig, {**data, **over})


def params(path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_an_iteration_without_signal_leaves_the_weights_unchanged(tmp_path, tiny_model_dir):
    cfg = config(tmp_path, tiny_model_dir, iterations=1,
                 tasks=write_tasks(tmp_path / "never.jsonl", 4, "online_task:never"))
    summary = run_online(cfg)
    it = summary["iterations"][0]
    assert it["groups_zero_spread"] == 2 and it["groups_trained"] == 0 and it["steps"] == 0
    assert torch.equal(params(cfg.output), params(tiny_model_dir))
    assert summary["status"] == "complete" and summary["cost"]["optimizer_steps"] == 0


def hand_loss(model_dir, trajs, returns, kl_coef=0.0, ref_dir=None):
    """Token-level normalized policy-gradient loss of one batch, from the saved trajectories."""
    from drift.models import load_tokenizer
    from drift.online.advantages import group_advantages
    from drift.train.data import tokenize_row

    tok = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(ref_dir or model_dir, dtype=torch.float32)
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(trajs):
        groups.setdefault(t["prompt_id"], []).append(i)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for idx in groups.values():
            rs = [returns[i] for i in idx]
            if max(rs) == min(rs):
                continue
            for i, a in zip(idx, group_advantages(rs)):
                ids, mask, _ = tokenize_row(trajs[i], tok, "all")
                x = torch.tensor([ids])
                lp = -F.cross_entropy(model(x).logits[0, :-1], x[0, 1:], reduction="none")
                lr = -F.cross_entropy(ref(x).logits[0, :-1], x[0, 1:], reduction="none")
                m = torch.tensor(mask[1:]) == 1
                d = (lr - lp)[m]
                total += float((-a * lp[m]).sum() + kl_coef * (torch.exp(d) - d - 1).sum())
                tokens += int(m.sum())
    return total / tokens


def read_trajs(path: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(path.glob("shard-*.jsonl")) for line in f.read_text().splitlines()]


def test_first_update_loss_equals_hand_computation(tmp_path, tiny_model_dir):
    cfg = config(tmp_path, tiny_model_dir, iterations=1)
    summary = run_online(cfg)
    it = summary["iterations"][0]
    trajs = read_trajs(Path(cfg.output) / "iterations/00001/rollout/trajectories")
    returns = [0.9 ** (t["success_turn"] - 1) if t["success_turn"] else 0.0 for t in trajs]
    repeat = [0.5 * (1 - len({x["answer_norm"] for x in t["turns"] if x["answer_norm"]})
                     / max(1, sum(bool(x["answer_norm"]) for x in t["turns"]))) for t in trajs]
    returns = [r - p - 0.1 * sum(x["status"] == "unparseable" for x in t["turns"])
               for r, p, t in zip(returns, repeat, trajs)]
    assert it["groups_trained"] >= 1, "the tiny task should give some groups return spread"
    # padded micro-batches against one row at a time: float32 noise, amplified by the centred advantages
    assert it["loss"] == pytest.approx(hand_loss(tiny_model_dir, trajs, returns), rel=1e-4)
    assert summary["cost"]["optimizer_steps"] == 1 and summary["cost"]["trained_tokens"] > 0
    assert summary["cost"]["generated_tokens"] > 0 and summary["cost"]["aux_forward_tokens"] == 0
    assert not torch.equal(params(cfg.output), params(tiny_model_dir))
    assert summary["curve"][-1]["iteration"] == 1 and len(summary["curve"][-1]["succ_at_k"]) == 2


def test_kl_presets_count_their_passes_and_change_the_loss(tmp_path, tiny_model_dir):
    ufo = run_online(config(tmp_path, tiny_model_dir, iterations=2, kl="ufo", output=str(tmp_path / "ufo")))
    matched = run_online(config(tmp_path, tiny_model_dir, iterations=2, kl="matched", beta=0.5,
                                output=str(tmp_path / "matched")))
    # at iteration 1 the policy is the reference: k1 = 0 and k3 = 0; afterwards both are > 0
    assert ufo["iterations"][0]["kl_k1_mean"] == pytest.approx(0.0, abs=1e-6)
    assert ufo["iterations"][1]["kl_k1_mean"] != pytest.approx(0.0, abs=1e-6)
    assert matched["iterations"][0]["kl_k3_mean"] == pytest.approx(0.0, abs=1e-6)
    later = matched["iterations"][1]
    assert later["steps"] >= 1, "iteration 2 trained nothing: k3 after an update is not tested"
    assert later["kl_k3_mean"] > 0
    # ufo: two aux passes over every conversation; matched: one over the trained ones
    assert ufo["cost"]["aux_forward_tokens"] > matched["cost"]["aux_forward_tokens"] > 0


def test_ppo_minibatches_clip_and_store_old_logprobs(tmp_path, tiny_model_dir):
    summary = run_online(config(tmp_path, tiny_model_dir, iterations=1, minibatches=2, update_epochs=2,
                                lr=5e-2))
    it = summary["iterations"][0]
    assert it["steps"] == 4 and summary["cost"]["optimizer_steps"] == 4
    assert summary["cost"]["aux_forward_tokens"] > 0  # the stored old log-probs
    # the first step's ratio to the stored log-probs is exactly 1 (nothing clipped); after three
    # steps at lr 5e-2 the ratio leaves [1 - 0.2, 1 + 0.28] for some tokens, which are clipped
    assert 0 < it["clipped_tokens"] < it["loss_tokens"]


def test_resume_refuses_other_settings(tmp_path, tiny_model_dir):
    run_online(config(tmp_path, tiny_model_dir, iterations=1))
    with pytest.raises(DriftError, match="other settings.*lr: 0.01 -> 0.02"):
        run_online(config(tmp_path, tiny_model_dir, iterations=1, lr=2e-2))


def _cli(tmp_path, model_dir, output, extra=()):
    tasks = write_tasks(tmp_path / "tasks.jsonl", 4)
    held_out = write_tasks(tmp_path / "held_out.jsonl", 3)
    return ["online", f"--model={model_dir}", f"--tasks={tasks}", f"--output={output}", "--n=4",
            "--batch-prompts=2", "--max-turns=2", "--max-new-tokens=3", "--iterations=3", "--lr=1e-2",
            "--eval-every=0", "--batch-size=8", "--micro-batch-size=3", "--resume", "--dtype=float32",
            f"--eval={json.dumps({'tasks': held_out, 'max_new_tokens': 3})}", *extra]


def _env():
    path = os.pathsep.join([str(ROOT / "src"), str(HERE), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def test_sigkill_and_resume_equals_an_uninterrupted_run(tmp_path, tiny_model_dir):
    cmd = [sys.executable, "-m", "drift.cli"]
    whole = subprocess.run(cmd + _cli(tmp_path, tiny_model_dir, tmp_path / "whole"), env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    cut = tmp_path / "cut"
    proc = subprocess.Popen(cmd + _cli(tmp_path, tiny_model_dir, cut), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = cut / "state" / "progress.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if progress.is_file() and json.loads(progress.read_text())["iterations_done"] >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((cut / "train_summary.json").read_text())["status"] == "running"
    again = subprocess.run(cmd + _cli(tmp_path, tiny_model_dir, cut), env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    a = json.loads((tmp_path / "whole" / "train_summary.json").read_text())
    b = json.loads((cut / "train_summary.json").read_text())
    assert [i["loss"] for i in a["iterations"]] == [i["loss"] for i in b["iterations"]]
    assert a["iterations_done"] == b["iterations_done"] == 3 and len(b["iterations"]) == 3
    assert torch.equal(params(tmp_path / "whole"), params(cut))


def test_two_processes_equal_one(tmp_path, tiny_model_dir):
    cmd = [sys.executable, "-m", "drift.cli"]
    one = subprocess.run(cmd + _cli(tmp_path, tiny_model_dir, tmp_path / "one", ["--iterations=2"]), env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    from test_accelerate import free_port

    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs/accelerate/cpu_2proc.yaml"), "--main_process_port", str(free_port()),
              "-m", "drift.cli"]
    two = subprocess.run(launch + _cli(tmp_path, tiny_model_dir, tmp_path / "two", ["--iterations=2"]), env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "train_summary.json").read_text())
    b = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    for x, y in zip(a["iterations"], b["iterations"], strict=True):
        assert x["groups_trained"] == y["groups_trained"] and x["return_mean"] == pytest.approx(y["return_mean"])
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-7)
    assert a["cost"]["trained_tokens"] == b["cost"]["trained_tokens"]
    assert torch.allclose(params(tmp_path / "one"), params(tmp_path / "two"), atol=1e-5)


def test_the_curve_is_held_out_problems_of_the_training_task(tmp_path, tiny_model_dir):
    from drift.online.run import eval_config

    cfg = build(OnlineConfig, {"tasks": "mul", "output": str(tmp_path), "system_prompt": "Be brief.", "max_turns": 2})
    ev = eval_config(cfg, "m", tmp_path / "e")
    assert (ev.tasks, ev.split, ev.system_prompt, ev.max_turns) == ("mul", "test", "Be brief.", 2)


def test_a_conversation_that_does_not_re_render_is_left_out_of_the_update(tmp_path, tiny_model_dir, monkeypatch):
    """A sampled message starting with spaces re-tokenizes merged with the template's newline: that
    conversation keeps its return in the group baseline but is not trained; the run goes on."""
    from drift.online import run as online
    from drift.train.data import RowError

    def tokenize(row, tokenizer, turns):
        if row["sample_idx"] == 0:
            raise RowError("assistant message 2: the chat template is not append-only", "template_not_prefix")
        return real(row, tokenizer, turns)

    real = online.tokenize_row
    monkeypatch.setattr(online, "tokenize_row", tokenize)
    summary = run_online(config(tmp_path, tiny_model_dir, iterations=1))
    it = summary["iterations"][0]
    assert summary["status"] == "complete" and len(it["unrenderable"]) == 2  # sample 0 of each of the 2 prompts
    assert all(c.endswith("#0") for c in it["unrenderable"])
    assert len(read_trajs(tmp_path / "online/iterations/00001/rollout/trajectories")) == 8
