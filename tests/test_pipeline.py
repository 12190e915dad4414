"""`drift run` end to end on a tiny random model: stages, skipping, --from, report, bad config."""

import json

import pytest

from drift import DriftError
from drift.cli import main
from drift.config import build
from drift.pipeline import RunConfig, check_disjoint, run_pipeline


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


def test_failed_stage_is_named_and_the_run_resumes(tmp_path, tiny_model_dir, monkeypatch):
    import errno

    import drift.train.trainer as trainer

    real = trainer.run_train

    def full_disk(cfg):
        raise OSError(errno.ENOSPC, "No space left on device", cfg.output)

    monkeypatch.setattr(trainer, "run_train", full_disk)
    cfg = build(RunConfig, config(tmp_path, tiny_model_dir))
    with pytest.raises(DriftError, match=r"stage train/drift: .*No space left on device.*rerun"):
        run_pipeline(cfg)
    run = tmp_path / "run"
    stamp = (run / "rollout/manifest.json").stat().st_mtime_ns
    assert (run / "eval/base/metrics.json").is_file() and not (run / "train/drift/train_summary.json").exists()
    monkeypatch.setattr(trainer, "run_train", real)
    run_pipeline(cfg)  # goes on from the failed stage; the finished rollout is not redone
    assert (run / "rollout/manifest.json").stat().st_mtime_ns == stamp
    assert (run / "train/sft/train_summary.json").is_file() and (run / "report.md").is_file()
