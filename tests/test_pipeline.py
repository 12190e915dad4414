"""`drift run` end to end on a tiny random model: stages, skipping, --from, report, bad config."""

import json
from pathlib import Path

import pytest

from drift import DriftError
from drift.cli import main
from drift.config import build, read_config_file
from drift import report
from drift.pipeline import DemoConfig, RunConfig, check_disjoint, demo_config, load_run, run_pipeline


def config(tmp_path, model_dir, **over):
    data = {
        "output": str(tmp_path / "run"), "model": str(model_dir),
        "rollout": {"tasks": "mc-arith", "split": "train", "num_problems": 3, "n": 2, "max_turns": 2,
                    "max_new_tokens": 4, "batch_size": 8},
        "train": {"epochs": 1, "batch_size": 2, "lr": 1e-4, "save_steps": 0},
        "eval": {"tasks": "mc-arith", "split": "test", "num_problems": 3, "max_turns": 2, "max_new_tokens": 4},
        "arms": {"drift": {"method": "drift", "train": {"min_weight": 0.0}}, "sft": {"method": "sft"}},
    }
    for k, v in over.items():
        data[k] = v
    return data


def test_pipeline_runs_skips_and_restarts(tmp_path, tiny_model_dir):
    cfg = build(RunConfig, config(tmp_path, tiny_model_dir))
    md = run_pipeline(cfg)
    run = tmp_path / "run"
    for f in ["config.json", "rollout/manifest.json", "weights/drift.jsonl", "weights/sft.weights.json",
              "train/drift/train_summary.json", "train/sft/config.json", "eval/base/metrics.json",
              "eval/sft/metrics.json", "report.md", "succ_at_k.png"]:
        assert (run / f).exists(), f
    assert "| base |" in md and "| drift (drift) |" in md and "## Cost" in md
    rows = [json.loads(x) for x in (run / "weights/sft.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["weight"] == 1.0 for r in rows)  # one shared rollout: 3 x 2
    stamp = (run / "train/drift/train_summary.json").stat().st_mtime_ns
    run_pipeline(cfg)  # everything complete: nothing reruns
    assert (run / "train/drift/train_summary.json").stat().st_mtime_ns == stamp
    run_pipeline(build(RunConfig, {**config(tmp_path, tiny_model_dir), "start_from": "train"}))
    assert (run / "train/drift/train_summary.json").stat().st_mtime_ns != stamp
    assert (run / "rollout/manifest.json").is_file()


def test_overlapping_train_and_test_is_an_error(tmp_path, tiny_model_dir):
    data = config(tmp_path, tiny_model_dir)
    data["eval"] = {**data["eval"], "split": "train"}
    data["rollout"] = {**data["rollout"], "num_problems": 200}
    data["eval"]["num_problems"] = 200
    with pytest.raises(DriftError, match="overlap"):
        check_disjoint(build(RunConfig, data))


def test_bad_config_names_the_key(tmp_path, tiny_model_dir, capsys):
    data = config(tmp_path, tiny_model_dir)
    data["train"] = {"lrr": 1e-5}
    with pytest.raises(DriftError, match="unknown config key 'arms.drift.train.lrr'"):
        build(RunConfig, data)
    path = tmp_path / "bad.toml"
    path.write_text('output = "x"\n[rollout]\nn = "many"\n')
    assert main(["run", str(path)]) == 2
    assert "config key 'rollout.n' expects int" in capsys.readouterr().err


def test_a_bad_value_names_the_arm_its_stage_was_built_for(tmp_path, tiny_model_dir, capsys):
    data = config(tmp_path, tiny_model_dir)
    data["arms"] = {**data["arms"], "grpo": {"method": "online", "online": {"gamma": 2.0}}}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    assert main(["run", str(path)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "drift run: error: arm grpo (online): config key 'gamma' must be in (0, 1], got 2.0"


def test_failed_stage_is_named_and_the_run_resumes(tmp_path, tiny_model_dir, monkeypatch):
    import errno

    import drift.train.trainer as trainer

    real = trainer.run_train

    def full_disk(cfg):
        raise OSError(errno.ENOSPC, "No space left on device", cfg.output)

    monkeypatch.setattr(trainer, "run_train", full_disk)
    cfg = build(RunConfig, config(tmp_path, tiny_model_dir))
    with pytest.raises(DriftError, match=r"stage train/drift: no space left on device writing .*/train/drift \(.* free\); "
                                         r"what is already written is kept: .*rerun the same command"):
        run_pipeline(cfg)
    run = tmp_path / "run"
    stamp = (run / "rollout/manifest.json").stat().st_mtime_ns
    assert (run / "eval/base/metrics.json").is_file() and not (run / "train/drift/train_summary.json").exists()
    monkeypatch.setattr(trainer, "run_train", real)
    run_pipeline(cfg)  # goes on from the failed stage; the finished rollout is not redone
    assert (run / "rollout/manifest.json").stat().st_mtime_ns == stamp
    assert (run / "train/sft/train_summary.json").is_file() and (run / "report.md").is_file()


def test_rerun_with_changed_settings_is_refused_until_redone(tmp_path, tiny_model_dir):
    """A finished stage is reused only under the settings that made it; --from redoes it."""
    data = config(tmp_path, tiny_model_dir)
    run_pipeline(build(RunConfig, data))
    run = tmp_path / "run"
    changed = {**data, "weights": {"beta": 0.3}}
    with pytest.raises(DriftError, match=r"weights/drift \(beta: 0.1 -> 0.3\).*weights/sft \(beta.*--from weights"):
        run_pipeline(build(RunConfig, changed))
    assert json.loads((run / "weights/drift.weights.json").read_text())["beta"] == 0.1  # nothing was touched
    with pytest.raises(DriftError, match=r"train/sft \(lr: 0.0001 -> 0.0002\).*--from train"):
        run_pipeline(build(RunConfig, {**data, "train": {**data["train"], "lr": 2e-4}}))
    with pytest.raises(DriftError, match=r"eval/base \(max_new_tokens: 4 -> 5\)"):
        run_pipeline(build(RunConfig, {**data, "eval": {**data["eval"], "max_new_tokens": 5}}))
    md = run_pipeline(build(RunConfig, {**changed, "start_from": "weights"}))
    assert json.loads((run / "weights/drift.weights.json").read_text())["beta"] == 0.3
    assert "`beta=0.3`" in md and "`beta=0.1`" not in md  # the report shows each artifact's own settings
    assert "## Correction" in md and "### oracle feedback (the loop stops at the first correct answer)" in md
    run_pipeline(build(RunConfig, changed))  # now consistent: every stage skipped


def test_keys_that_cannot_change_results_do_not_count(tmp_path, tiny_model_dir):
    data = config(tmp_path, tiny_model_dir)
    run_pipeline(build(RunConfig, data))
    stamp = (tmp_path / "run/train/drift/train_summary.json").stat().st_mtime_ns
    data["rollout"] = {**data["rollout"], "batch_size": 3, "threads": 1}
    data["train"] = {**data["train"], "logging_steps": 5}
    run_pipeline(build(RunConfig, data))
    assert (tmp_path / "run/train/drift/train_summary.json").stat().st_mtime_ns == stamp


def test_an_upstream_redo_makes_downstream_outputs_stale(tmp_path, tiny_model_dir):
    """Outputs made from another input are refused even when their own settings match."""
    import shutil

    data = config(tmp_path, tiny_model_dir)
    run_pipeline(build(RunConfig, data))
    shutil.rmtree(tmp_path / "run/rollout")
    data["rollout"] = {**data["rollout"], "seed": 5}
    with pytest.raises(DriftError, match=r"weights/drift \(made from another input: an earlier stage was "
                                         r"redone\).*--from weights"):
        run_pipeline(build(RunConfig, data))


def test_eval_inherits_the_rollout_environment(tmp_path, tiny_model_dir):
    data = config(tmp_path, tiny_model_dir)
    data["rollout"] = {**data["rollout"], "system_prompt": "Be brief.", "feedback": "Wrong, try again."}
    cfg = build(RunConfig, data)
    ev = cfg.eval_config("base")
    assert (ev.system_prompt, ev.feedback) == ("Be brief.", "Wrong, try again.")
    data["eval"] = {**data["eval"], "feedback": "No."}
    assert build(RunConfig, data).eval_config("drift").feedback == "No."  # set explicitly: kept, and shown
    md = run_pipeline(build(RunConfig, {**data, "arms": {"drift": {"method": "drift"}}}))
    assert "| feedback | 'Wrong, try again.' | **'No.'** | **'No.'** |" in md
    assert "| system_prompt | 'Be brief.' | 'Be brief.' | 'Be brief.' |" in md


def test_a_crashed_eval_resumes(tmp_path, tiny_model_dir, monkeypatch):
    import drift.evaluate as evaluate

    real = evaluate.compute_metrics
    monkeypatch.setattr(evaluate, "compute_metrics", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    data = config(tmp_path, tiny_model_dir, arms={"drift": {"method": "drift"}})
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(build(RunConfig, data))
    assert (tmp_path / "run/eval/base/rollout/manifest.json").is_file()
    monkeypatch.setattr(evaluate, "compute_metrics", real)
    run_pipeline(build(RunConfig, data))
    assert (tmp_path / "run/eval/drift/metrics.json").is_file()


def test_a_second_writer_gets_one_clear_line(tmp_path, tiny_model_dir):
    from drift.rundir import Lock

    data = config(tmp_path, tiny_model_dir)
    (tmp_path / "run").mkdir()
    with Lock(tmp_path / "run"):
        with pytest.raises(DriftError, match="being written by another drift process"):
            run_pipeline(build(RunConfig, data))


def test_report_has_the_ledger_and_cost_figure(tmp_path, tiny_model_dir):
    md = run_pipeline(build(RunConfig, config(tmp_path, tiny_model_dir)))
    assert "| rollout |" in md and "| weights/drift |" in md and "| train/drift |" in md and "FLOPs" in md
    assert (tmp_path / "run/cost.png").is_file()
    summary = json.loads((tmp_path / "run/train/drift/train_summary.json").read_text())
    manifest = json.loads((tmp_path / "run/rollout/manifest.json").read_text())
    assert manifest["cost"]["generated_tokens"] == manifest["timings"]["sessions"][0]["generated_tokens"] > 0
    assert manifest["cost"]["parameters"] > 0 and manifest["cost"]["flops"] > 0
    assert summary["status"] == "complete" and summary["settings"]["lr"] == 1e-4


def test_online_arm_beside_the_offline_ones(tmp_path, tiny_model_dir):
    """One config compares DRIFT and online RL on the same rollout environment and held-out set."""
    data = config(tmp_path, tiny_model_dir, arms={
        "drift": {"method": "drift"},
        "grpo": {"method": "online", "weights": {"beta": 0.2},
                 "online": {"iterations": 2, "batch_prompts": 2, "eval_every": 1, "lr": 1e-3}}})
    cfg = build(RunConfig, data)
    oc = cfg.kinds["grpo"].online_config(cfg)
    assert (oc.n, oc.max_turns, oc.max_new_tokens, oc.tasks, oc.split) == (2, 2, 4, "mc-arith", "train")
    assert oc.beta == 0.2 and oc.eval == data["eval"]
    md = run_pipeline(cfg)
    run = tmp_path / "run"
    summary = json.loads((run / "online/grpo/train_summary.json").read_text())
    assert summary["status"] == "complete" and [p["iteration"] for p in summary["curve"]] == [1, 2]
    held_out = json.loads((run / "eval/grpo/metrics.json").read_text())
    assert held_out["settings"]["problems"] == json.loads((run / "eval/base/metrics.json").read_text())[
        "settings"]["problems"]
    assert "| grpo (online) |" in md and "## Learning curves of the online arms" in md
    assert "| online/grpo |" in md
    from drift.pipeline import load_run

    loaded, recs = load_run(run)
    assert loaded.arms["grpo"].method == "online"
    assert loaded.arm("grpo").cost(recs).flops == pytest.approx(summary["cost"]["flops"])  # not the shared rollout
    parts = ("rollout", "weights/drift", "train/drift")
    assert loaded.arm("drift").cost(recs).flops == pytest.approx(sum(recs[p]["cost"]["flops"] for p in parts))
    run_pipeline(cfg)  # complete: skipped
    with pytest.raises(DriftError, match=r"online/grpo \(lr: 0.001 -> 0.002\).*--from train"):
        data["arms"]["grpo"]["online"]["lr"] = 2e-3
        run_pipeline(build(RunConfig, data))


def test_rerun_after_a_crash_trains_like_an_uninterrupted_run(tmp_path, tiny_model_dir, monkeypatch):
    """Process-global state does not leak from one stage to the next: the rollout's thread count
    is restored, so a rerun that skips the rollout trains exactly as the uninterrupted run did."""
    import torch

    import drift.train.trainer as trainer
    from test_trainer import final_params

    real, seen = trainer.run_train, []

    def recording(cfg):
        seen.append(torch.get_num_threads())
        return real(cfg)

    monkeypatch.setattr(trainer, "run_train", recording)
    torch.set_num_threads(2)
    try:
        data = config(tmp_path, tiny_model_dir, arms={"sft": {"method": "sft"}})
        data["rollout"] = {**data["rollout"], "threads": 1}
        run_pipeline(build(RunConfig, {**data, "output": str(tmp_path / "whole")}))

        def crash(cfg):
            raise KeyboardInterrupt

        monkeypatch.setattr(trainer, "run_train", crash)
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(build(RunConfig, {**data, "output": str(tmp_path / "cut")}))
        monkeypatch.setattr(trainer, "run_train", recording)
        run_pipeline(build(RunConfig, {**data, "output": str(tmp_path / "cut")}))
    finally:
        torch.set_num_threads(1)
    assert seen == [2, 2]
    assert torch.equal(final_params(tmp_path / "whole/train/sft"), final_params(tmp_path / "cut/train/sft"))


def test_sigkill_during_training_then_rerun_finishes_the_run(tmp_path, tiny_model_dir):
    data = config(tmp_path, tiny_model_dir, arms={"drift": {"method": "drift"}})
    data["train"] = {**data["train"], "epochs": 8, "save_steps": 2, "logging_steps": 1}
    summary = tmp_path / "run/train/drift/train_summary.json"
    rerun = run_and_kill(tmp_path, data, lambda: any(summary.parent.glob("checkpoint-*/drift_checkpoint.json")))
    assert json.loads(summary.read_text())["status"] == "running"
    with pytest.raises(DriftError, match="training did not finish"):
        from drift.models import resolve_model

        resolve_model(str(summary.parent))
    done = rerun()
    assert done.returncode == 0, done.stderr[-2000:]
    final = json.loads(summary.read_text())
    assert final["status"] == "complete" and final["resumed_from"] is not None
    assert final["steps"] == 8 * 3  # 6 rows, batch 2: 3 steps an epoch


@pytest.mark.parametrize("round_data", ["continue", "union"])
def test_iterated_drift_rounds(tmp_path, tiny_model_dir, round_data, capsys):
    data = config(tmp_path, tiny_model_dir, arms={"drift": {"method": "drift", "rounds": 3, "round_data": round_data,
                                                             "train": {"min_weight": 0.0}}})
    cfg = build(RunConfig, data)
    _, _, t2 = cfg.kinds["drift"].stage_configs(cfg, 2)
    r3, _, t3 = cfg.kinds["drift"].stage_configs(cfg, 3)
    run = tmp_path / "run"
    assert r3.model == str(run / "rounds/drift/round-2/train") and r3.seed != cfg.rollout_config().seed
    if round_data == "continue":
        assert t2.model == str(run / "train/drift") and t3.data == str(run / "rounds/drift/round-3/weights.jsonl")
    else:
        assert t3.model == str(tiny_model_dir) and t3.data == str(run / "rounds/drift/round-3/union.jsonl")
    md = run_pipeline(cfg)
    for k in (2, 3):
        assert json.loads((run / f"rounds/drift/round-{k}/train/train_summary.json").read_text())["status"] == "complete"
    for k in (1, 2):
        assert (run / f"rounds/drift/round-{k}/eval/metrics.json").is_file()
    final = json.loads((run / "eval/drift/metrics.json").read_text())
    assert final["settings"]["model"] == "trained:" + json.loads(
        (run / "rounds/drift/round-3/train/train_summary.json").read_text())["digest"]
    m3 = json.loads((run / "rounds/drift/round-3/rollout/manifest.json").read_text())
    assert m3["settings"]["model"].startswith("trained:") and m3["status"] == "complete"
    if round_data == "union":
        assert len(json.loads((run / "rounds/drift/round-3/union.weights.json").read_text())["settings"]["union_of"]) == 3
    assert "## Rounds of the iterated arms" in md
    run_pipeline(cfg)  # complete: every stage skipped
    capsys.readouterr()
    report.print_console_summary(*load_run(run))  # the demo's closing screen: a row per round, with its cost
    rows = [line.split("│")[1].strip() for line in capsys.readouterr().out.splitlines() if line.count("│") > 5]
    assert rows[:4] == ["base", "drift@1", "drift@2", "drift@3"]


def test_sigkill_in_a_later_round_resumes_there(tmp_path, tiny_model_dir):
    data = config(tmp_path, tiny_model_dir, arms={"drift": {"method": "drift", "rounds": 2}})
    data["rollout"] = {**data["rollout"], "num_problems": 6, "n": 4, "max_new_tokens": 8}
    shards = tmp_path / "run/rounds/drift/round-2/rollout/trajectories"
    rerun = run_and_kill(tmp_path, data, lambda: any(shards.glob("shard-*.jsonl")))
    train1 = tmp_path / "run/train/drift/train_summary.json"
    stamp = train1.stat().st_mtime_ns
    done = rerun()
    assert done.returncode == 0, done.stderr[-2000:]
    assert train1.stat().st_mtime_ns == stamp  # round 1 was not redone
    manifest = json.loads((shards.parent / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["written"] == 6 * 4  # nothing duplicated
    assert (tmp_path / "run/eval/drift/metrics.json").is_file()


RUN_MARK = "DRIFT_TEST_RUN"  # in the environment of `run_and_kill`'s run and every process it starts


def processes_of(tmp_path) -> list[int]:
    """The live processes (worker processes included) of a `run_and_kill` run in tmp_path."""
    from pathlib import Path

    mark = f"{RUN_MARK}={tmp_path}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and mark in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:  # ended meanwhile, or not ours to read
            pass
    return found


def run_and_kill(tmp_path, data, started):
    """`drift run` on `data` in a subprocess, SIGKILLed once `started()` holds; returns the rerun command."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    path = tmp_path / "run.json"
    path.write_text(json.dumps(data))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", RUN_MARK: str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "drift.cli", "run", str(path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not started():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return lambda: subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml")),
                         ids=lambda p: p.name)
def test_every_shipped_run_config_builds(path):
    cfg = build(RunConfig, read_config_file(path))
    train, test = check_disjoint(cfg)
    assert train and test and cfg.arms


@pytest.mark.parametrize("quick", [False, True])
def test_demo_presets_build(quick):
    cfg = demo_config(DemoConfig(quick=quick))
    train, test = check_disjoint(cfg)
    assert train and test and cfg.arms
