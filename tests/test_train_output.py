"""A training run never lies about itself: checkpoints carry their settings and counters, a
resume takes the newest complete one, a killed run cannot pass for a finished one."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from drift import DriftError
from drift.rundir import Lock, checkpoint_record
from drift.train.output import require_trained
from drift.train.trainer import WeightedTrainer
from test_trainer import final_params, make_rows, train, write_data

COUNTS = ("steps", "trained_tokens", "tokens", "capped_tokens", "padding_share")


def summary_of(out):
    return json.loads((out / "train_summary.json").read_text())


def test_resume_with_other_settings_is_refused(tmp_path, tiny_model_dir):
    data = write_data(tmp_path / "w.jsonl", make_rows(8, seed=4))
    train(tmp_path, tiny_model_dir, data, max_steps=2, save_steps=1, batch_size=2)
    out = tmp_path / "out"
    assert json.loads(checkpoint_record(out / "checkpoint-1").read_text())["settings"]["lr"] == 1e-3
    with pytest.raises(DriftError, match=r"cannot resume from .*checkpoint-1: it was made with other settings "
                                         r"\(lr: 0.001 -> 0.002; max_length: 1024 -> 512\)"):
        train(tmp_path, tiny_model_dir, data, max_steps=2, save_steps=1, batch_size=2, lr=2e-3, max_length=512,
              resume_from_checkpoint="latest")
    assert summary_of(out)["status"] == "complete" and (out / "model.safetensors").is_file()  # nothing lost


def test_resume_on_other_rows_is_refused(tmp_path, tiny_model_dir):
    """Rows without a `drift weights` record are identified by their bytes: a resume on other rows
    (here the first 6 of the 16) would train 0 steps and claim the new data."""
    rows = make_rows(16, seed=5)
    a = write_data(tmp_path / "a.jsonl", rows)
    b = write_data(tmp_path / "b.jsonl", rows[:6])
    train(tmp_path, tiny_model_dir, a, max_steps=4, save_steps=2, batch_size=2)
    with pytest.raises(DriftError, match=r"checkpoint-2: it was made with other settings \(input: made from rows:"):
        train(tmp_path, tiny_model_dir, b, max_steps=4, save_steps=2, batch_size=2, resume_from_checkpoint="latest")


def test_a_fresh_run_removes_the_checkpoints_of_an_earlier_run(tmp_path, tiny_model_dir):
    """Otherwise "latest" after a kill would name the earlier run's newest checkpoint and refuse it,
    although this run's own checkpoint is there. No checkpoint is saved at the last step: resuming
    from it would train a step past max_steps; the one before is resumed and the rest redone."""
    data = write_data(tmp_path / "w.jsonl", make_rows(8, seed=4))
    train(tmp_path, tiny_model_dir, data, max_steps=4, save_steps=1, batch_size=2, save_total_limit=4)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    again = train(tmp_path, tiny_model_dir, data, max_steps=3, save_steps=1, batch_size=2, lr=2e-3)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    params = final_params(out)
    resumed = train(tmp_path, tiny_model_dir, data, max_steps=3, save_steps=1, batch_size=2, lr=2e-3,
                    resume_from_checkpoint="latest")
    assert resumed["resumed_from"] == str(out / "checkpoint-2") and resumed["steps"] == again["steps"] == 3
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in again["history"]], rel=1e-5)
    assert torch.allclose(final_params(out), params, atol=1e-6)


def test_latest_skips_an_incomplete_checkpoint_and_counts_like_an_uninterrupted_run(tmp_path, tiny_model_dir, caplog):
    data = write_data(tmp_path / "w.jsonl", make_rows(12, seed=4, weights=[1.0, -0.5, 2.0] * 4))
    kw = dict(max_steps=3, save_steps=1, save_total_limit=3, batch_size=2, allow_negative_weights=True,
              negative_nll_cap=1.0)
    full = train(tmp_path, tiny_model_dir, data, **kw)
    out = tmp_path / "out"
    params = final_params(out)
    assert full["capped_tokens"] > 0
    checkpoint_record(out / "checkpoint-2").unlink()  # killed while saving checkpoint 2
    with caplog.at_level(logging.WARNING, logger="drift.train.output"):
        resumed = train(tmp_path, tiny_model_dir, data, resume_from_checkpoint="latest", **kw)
    assert "skipping" in caplog.text and "checkpoint-2: incomplete" in caplog.text
    assert resumed["resumed_from"] == str(out / "checkpoint-1")
    assert [resumed[k] for k in COUNTS] == [full[k] for k in COUNTS]
    for k in ("trained_tokens", "optimizer_steps"):
        assert resumed["cost"][k] == full["cost"][k]
    assert resumed["history"][-1]["loss"] == pytest.approx(full["history"][-1]["loss"], rel=1e-5)
    assert torch.allclose(final_params(out), params, atol=1e-6)


def test_incomplete_or_missing_checkpoints_are_refused(tmp_path, tiny_model_dir):
    data = write_data(tmp_path / "w.jsonl", make_rows(4))
    half = tmp_path / "out" / "checkpoint-5"
    half.mkdir(parents=True)
    with pytest.raises(DriftError, match="checkpoint-5: incomplete checkpoint"):
        train(tmp_path, tiny_model_dir, data, resume_from_checkpoint=str(half))
    with pytest.raises(DriftError, match="no complete checkpoint-\\* in"):
        train(tmp_path, tiny_model_dir, data, resume_from_checkpoint="latest")
    with pytest.raises(DriftError, match="checkpoint not found"):
        train(tmp_path, tiny_model_dir, data, resume_from_checkpoint=str(tmp_path / "nowhere"))


def test_killed_retrain_leaves_no_old_model_and_says_running(tmp_path, tiny_model_dir, monkeypatch):
    data = write_data(tmp_path / "w.jsonl", make_rows(4))
    done = train(tmp_path, tiny_model_dir, data, max_steps=1, lora=True, lora_r=4, merge_lora=True)
    out = tmp_path / "out"
    assert done["status"] == "complete" and done["stage"] == "train" and summary_of(out)["digest"] == done["digest"]
    require_trained(out)
    require_trained(tiny_model_dir)  # not a drift training output: nothing to check

    def killed(self, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(WeightedTrainer, "train", killed)
    with pytest.raises(RuntimeError, match="killed"):
        train(tmp_path, tiny_model_dir, data, max_steps=1)
    assert summary_of(out)["status"] == "running"
    assert not [p.name for p in out.iterdir() if p.name.startswith(("model", "adapter_", "merged"))]
    with pytest.raises(DriftError, match="out: training did not finish \\(status running\\); rerun drift train"):
        require_trained(out)


def test_summary_carries_the_stage_record_and_cost(tmp_path, tiny_model_dir):
    data = write_data(tmp_path / "w.jsonl", make_rows(4))
    (tmp_path / "w.weights.json").write_text(json.dumps({"stage": "weights", "status": "complete",
                                                         "schema_version": 1, "digest": "abc"}))
    summary = train(tmp_path, tiny_model_dir, data, max_steps=2, batch_size=2)
    assert summary["input"] == {"path": data, "digest": "abc"}
    assert summary["settings"]["lr"] == 1e-3 and "output" not in summary["settings"]
    cost = summary["cost"]
    assert cost["trained_tokens"] == summary["tokens"] and cost["optimizer_steps"] == 2
    assert cost["parameters"] > 0 and cost["wall_seconds"] > 0 and cost["flops"] > 0


def test_unwritable_output_fails_before_training(tmp_path, tiny_model_dir):
    data = write_data(tmp_path / "w.jsonl", make_rows(4))
    (tmp_path / "file").write_text("")
    with pytest.raises(DriftError, match="cannot write to"):
        train(tmp_path, tiny_model_dir, data, "file/out")


def test_a_directory_that_refuses_writes_fails_before_training(tmp_path, tiny_model_dir, monkeypatch):
    """As a non-root user on a read-only directory: the probe file cannot be written."""
    from pathlib import Path

    data = write_data(tmp_path / "w.jsonl", make_rows(4))
    real = Path.write_bytes

    def refuse(self, data):
        if self.name.startswith(".drift-write-test"):
            raise PermissionError(13, "Permission denied")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", refuse)
    with pytest.raises(DriftError, match=r"cannot write to .*ro: Permission denied"):
        train(tmp_path, tiny_model_dir, data, "ro")
    assert not (tmp_path / "ro" / "train_summary.json").exists()


def test_an_output_being_written_is_refused(tmp_path, tiny_model_dir):
    data = write_data(tmp_path / "w.jsonl", make_rows(4))
    with Lock(tmp_path / "out"), pytest.raises(DriftError, match="being written by another drift process"):
        train(tmp_path, tiny_model_dir, data)
