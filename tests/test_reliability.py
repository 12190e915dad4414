"""Reliability through the real CLI (`drift.cli.main`): a custom checker's answer must be a bool,
a full disk and a damaged output are one clear line with nothing lost, and resumes are exact.

The checker functions below are imported by name (`test_reliability:fn`) in checker workers.
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import random
import subprocess
from pathlib import Path

import pytest

from drift.cli import main


def says_yes(answer: str, gold: str) -> str:
    return "yes"


def same_text(answer: str, gold: str) -> bool:
    return answer == gold


def write_tasks(path, checker: str) -> str:
    rows = [{"id": f"q{i}", "question": f"What is {i} + 11?", "answer": str(i + 11), "checker": checker,
             "extract": "full"} for i in range(2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def error_lines(capsys) -> list[str]:
    return [x for x in capsys.readouterr().err.strip().splitlines() if x.startswith("drift ")]


def test_a_custom_checker_that_answers_yes_stops_the_rollout_with_one_line(tmp_path, capsys, tiny_model_dir):
    tasks = write_tasks(tmp_path / "tasks.jsonl", "test_reliability:says_yes")
    rc = main(["rollout", "--model", str(tiny_model_dir), "--tasks", tasks, "--output", str(tmp_path / "r"),
               "--n", "1", "--max-turns", "1", "--max-new-tokens", "4", "--temperature", "1.0"])
    assert rc == 2
    assert error_lines(capsys)[-1] == ("drift rollout: error: custom checker test_reliability:says_yes returned 'yes' "
                                       "(str); it must return True (correct), False (wrong) or None (unparseable)")


@pytest.mark.parametrize("checker,gold,right,wrong", [
    ("exact", "caf\u00e9", "cafe\u0301", "the\u0301"),  # gold in NFC, the answer in NFD
    ("exact", "Stra\u00dfe", "STRASSE", "STRASE"),  # case-folded
    ("choice", "B", "\uff22", "\uff21"),  # full-width letters (NFKC)
    ("test_reliability:same_text", "caf\u00e9", "cafe\u0301", "the\u0301"),  # a user function gets NFC text
])
def test_every_text_checker_judges_a_planted_answer_unicode_normalized(tmp_path, capsys, tiny_model_dir, checker, gold,
                                                                       right, wrong):
    """A planted first answer is judged by the task's checker like a model's, through the real CLI;
    one judged right ends the conversation at once, which `drift eval` refuses in one line: so the
    line shows the checker took the otherwise-encoded answer as the gold one."""
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"id": "u", "question": "Say it.", "answer": gold, "checker": checker,
                                 "extract": "full"}) + "\n")
    args = ["eval", "--model", str(tiny_model_dir), "--tasks", str(tasks), "--split", "all", "--protocol", "planted",
            "--max-turns", "2", "--max-new-tokens", "3"]
    for name, answer in [("right", right), ("wrong", wrong)]:
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"prompt_id": "u", "response": answer}) + "\n")
    assert main([*args, "--planted", str(tmp_path / "right.jsonl"), "--output", str(tmp_path / "e")]) == 2
    assert error_lines(capsys) == ["drift eval: error: problem u: its planted answer ends the conversation at once "
                                   "(it is correct, or max_turns is 1): nothing is left to answer"]
    assert main([*args, "--planted", str(tmp_path / "wrong.jsonl"), "--output", str(tmp_path / "e2")]) == 0  # control
    turn1 = json.loads((tmp_path / "e2/rollout/trajectories/shard-00000.jsonl").read_text().splitlines()[0])["turns"][0]
    assert turn1["status"] == "wrong"


# --- a full disk -------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a given size mounted under tmp_path (needs root; skipped where mount is refused)."""
    mounted = []

    def mount(kib: int):
        d = tmp_path / f"disk{len(mounted)}"
        d.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(d)],
                          capture_output=True).returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(d)
        return d

    yield mount
    gc.collect()  # a failed save's open file lives on in its traceback's frames until collected
    for d in mounted:
        if subprocess.run(["umount", str(d)], capture_output=True).returncode:
            subprocess.run(["umount", "--lazy", str(d)], check=False)


def fill(disk) -> Path:
    """Fill `disk` to the last byte with one file; removing it frees the space again."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def weighted_rows(path, n=8):
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": f"<answer>{2 * i}</answer>"}], "weight": 1.0 + i % 2}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def train_args(model, data, out, *extra):
    return ["train", "--model", str(model), "--data", data, "--output", str(out), "--batch-size", "2", "--lr", "1e-3",
            "--logging-steps", "1", "--warmup-ratio", "0", *extra]


def test_train_refuses_a_disk_too_small_before_training(tmp_path, capsys, tiny_model_dir, small_disk):
    disk = small_disk(128)  # the tiny model's float32 weights alone are ~360 KiB
    out = disk / "t"
    rc = main(train_args(tiny_model_dir, weighted_rows(tmp_path / "w.jsonl"), out, "--max-steps", "2"))
    line = error_lines(capsys)[-1]
    assert rc == 2 and line.startswith(f"drift train: error: not enough space for {out}: ")
    assert "free, the run writes about" in line and "model " in line
    assert not (out / "train_summary.json").exists()  # refused before the output was marked running


def test_train_full_disk_at_save_is_one_line_and_resumes(tmp_path, capsys, tiny_model_dir, monkeypatch):
    """The model's save meets a full disk (monkeypatched: the save raises ENOSPC as the OS would),
    after checkpoints were saved: one line, the checkpoints kept, the rerun resumes from them."""
    from drift.train import trainer

    out = tmp_path / "t"

    real = trainer.WeightedTrainer.save_model

    def full(self, output_dir=None, *args, **kwargs):
        if output_dir == str(out):  # the model's save; the checkpoints' go through
            raise OSError(errno.ENOSPC, "No space left on device", str(out / "model.safetensors"))
        return real(self, output_dir, *args, **kwargs)

    monkeypatch.setattr(trainer.WeightedTrainer, "save_model", full)
    args = train_args(tiny_model_dir, weighted_rows(tmp_path / "w.jsonl"), out, "--max-steps", "3",
                      "--save-steps", "1")
    assert main(args) == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"drift train: error: no space left on device writing {out} (")
    assert line.endswith("rerun with --resume-from-checkpoint latest (drift run does so itself)")
    assert json.loads((out / "train_summary.json").read_text())["status"] == "running"
    assert (out / "checkpoint-2" / "drift_checkpoint.json").is_file()
    monkeypatch.setattr(trainer.WeightedTrainer, "save_model", real)  # space freed
    assert main([*args, "--resume-from-checkpoint", "latest"]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["status"] == "complete" and summary["steps"] == 3 and summary["resumed_from"].endswith("checkpoint-2")


@pytest.mark.parametrize("left_kib,resume", [
    (100, False),  # checkpoint-1's weights meet the full disk (safetensors' own error type)
    (600, False),  # its optimizer state does (torch.save's RuntimeError, which names no errno)
    (1500, True),  # checkpoint-2's save does, after checkpoint-1 was whole
])
def test_train_meeting_a_really_full_disk_mid_run_is_one_line_and_resumes(tmp_path, capsys, tiny_model_dir, small_disk,
                                                                          monkeypatch, left_kib, resume):
    """Another writer fills the disk right after the space check passed: drift's own saves then
    meet a real ENOSPC from the filesystem (nothing here raises it for them)."""
    from drift.train import trainer

    disk = small_disk(8192)
    out = disk / "t"
    real = trainer.check_space
    fillers = []

    def then_fill(output, needed, fresh):
        real(output, needed, fresh)
        fillers.append(fill(disk))
        os.truncate(fillers[0], fillers[0].stat().st_size - left_kib * 1024)

    monkeypatch.setattr(trainer, "check_space", then_fill)
    args = train_args(tiny_model_dir, weighted_rows(tmp_path / "w.jsonl"), out, "--max-steps", "3", "--save-steps", "1")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"drift train: error: no space left on device writing {out} (")
    assert line.endswith("rerun with --resume-from-checkpoint latest (drift run does so itself)" if resume
                         else "rerun the same command")
    assert json.loads((out / "train_summary.json").read_text())["status"] == "running"
    assert (out / "checkpoint-1" / "drift_checkpoint.json").is_file() == resume  # what was whole is kept
    monkeypatch.setattr(trainer, "check_space", real)
    fillers[0].unlink()  # space freed
    assert main([*args, *(["--resume-from-checkpoint", "latest"] if resume else [])]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["status"] == "complete" and summary["steps"] == 3
    assert (summary["resumed_from"] or "").endswith("checkpoint-1") == resume


def test_a_torch_write_failure_on_a_disk_with_room_is_not_called_full(tmp_path):
    from drift.rundir import is_space_error

    short = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 206848 vs 206740")
    assert not is_space_error(short, tmp_path, 1024)  # the disk has room: another fault, shown as it is
    assert not is_space_error(short)  # without the path written, nothing tells


def test_weights_and_rollout_on_a_full_disk_are_one_line_then_run(tmp_path, capsys, tiny_model_dir, small_disk):
    disk = small_disk(256)
    filler = fill(disk)
    tasks = write_tasks(tmp_path / "tasks.jsonl", "exact")
    rollout = ["rollout", "--model", str(tiny_model_dir), "--tasks", tasks, "--output", str(disk / "r"), "--n", "2",
               "--max-turns", "1", "--max-new-tokens", "4", "--temperature", "1.0"]
    assert main(rollout) == 2
    assert error_lines(capsys)[-1].startswith(f"drift rollout: error: no space left on device writing {disk / 'r'}")
    weights = ["weights", str(tmp_path / "r0"), "--output", str(disk / "w.jsonl")]
    assert main(["rollout", *rollout[1:-10], "--output", str(tmp_path / "r0"), *rollout[-8:]]) == 0
    capsys.readouterr()
    assert main(weights) == 2
    assert error_lines(capsys)[-1].startswith(f"drift weights: error: no space left on device writing {disk}")
    filler.unlink()
    assert main(rollout) == 0 and main(weights) == 0
    assert (disk / "w.jsonl").read_text()


def test_online_meeting_a_full_disk_at_its_state_save_is_one_line_and_resumes(tmp_path, capsys, tiny_model_dir,
                                                                              small_disk, monkeypatch):
    """The disk fills up just before iteration 2's state is saved (torch.save then meets a real
    ENOSPC): one line, iteration 1's state kept, and --resume finishes the run."""
    from online_task import write_tasks as online_tasks

    from drift.online import state

    disk = small_disk(8192)
    out = disk / "o"
    real = state.save
    fillers = []

    def fill_then_save(o, policy_state, progress):
        if progress["iterations_done"] == 2:
            fillers.append(fill(disk))
        real(o, policy_state, progress)

    monkeypatch.setattr(state, "save", fill_then_save)
    args = ["online", f"--model={tiny_model_dir}", f"--tasks={online_tasks(tmp_path / 'tasks.jsonl', 4)}",
            f"--output={out}", "--n=2", "--batch-prompts=2", "--max-turns=1", "--max-new-tokens=3", "--iterations=2",
            "--eval-every=0", "--dtype=float32", '--eval={"num_problems": 2, "max_new_tokens": 3}']
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"drift online: error: no space left on device writing {out} (")
    assert line.endswith("rerun the same command with --resume (it goes on from the last saved iteration)")
    assert json.loads((out / "state/progress.json").read_text())["iterations_done"] == 1
    fillers[0].unlink()
    monkeypatch.setattr(state, "save", real)
    assert main([*args, "--resume"]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["status"] == "complete" and summary["iterations_done"] == 2


def test_drift_run_on_a_disk_too_small_for_its_training_is_one_line_then_resumes(tiny_model_dir, capsys, caplog,
                                                                                 small_disk):
    from test_pipeline import config

    disk = small_disk(256)  # room for the rollout, weights and base eval; not for a model (~0.4 MiB)
    data = config(disk, tiny_model_dir, arms={"drift": {"method": "drift", "train": {"min_weight": 0.0}}})
    cfg = disk.parent / "run.json"
    cfg.write_text(json.dumps(data))
    assert main(["run", str(cfg)]) == 2
    line = error_lines(capsys)[-1]
    assert line.startswith(f"drift run: error: stage train/drift: not enough space for {disk / 'run/train/drift'}: ")
    assert "free, the run writes about" in line
    stamp = (disk / "run/rollout/manifest.json").read_bytes()
    assert json.loads(stamp)["status"] == "complete" and (disk / "run/weights/drift.jsonl").is_file()
    subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)  # space freed
    caplog.set_level(logging.INFO, logger="drift")
    assert main(["run", str(cfg)]) == 0
    assert "stage rollout: complete, skipped" in caplog.text and "stage weights/drift: complete, skipped" in caplog.text
    assert (disk / "run/rollout/manifest.json").read_bytes() == stamp and (disk / "run/report.md").is_file()


# --- damaged outputs ---------------------------------------------------------------------


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_model_is_refused_by_every_loader_and_retrained(tmp_path, capsys, tiny_model_dir):
    out = tmp_path / "t"
    data = weighted_rows(tmp_path / "w.jsonl")
    assert main(train_args(tiny_model_dir, data, out, "--max-steps", "1")) == 0
    files = json.loads((out / "train_summary.json").read_text())["files"]
    assert set(files) == {"model.safetensors"} and files["model.safetensors"]["bytes"] > 0
    truncate(out / "model.safetensors")
    capsys.readouterr()
    # a command that loads the model refuses it: here, training on from it
    assert main(train_args(out, data, tmp_path / "t2", "--max-steps", "1")) == 2
    line = error_lines(capsys)[-1]
    assert line.startswith(f"drift train: error: {out}: damaged model: model.safetensors has ")
    assert "its record says" in line and "truncated" in line
    assert main(train_args(tiny_model_dir, data, out, "--max-steps", "1")) == 0  # the same command mends it
    assert main(train_args(out, data, tmp_path / "t2", "--max-steps", "1")) == 0


def test_drift_train_refuses_damaged_weighted_rows(tmp_path, capsys, tiny_model_dir):
    rollout = tmp_path / "r"
    tasks = write_tasks(tmp_path / "tasks.jsonl", "exact")
    assert main(["rollout", "--model", str(tiny_model_dir), "--tasks", tasks, "--output", str(rollout), "--n", "2",
                 "--max-turns", "1", "--max-new-tokens", "4", "--temperature", "1.0"]) == 0
    assert main(["weights", str(rollout), "--output", str(tmp_path / "w.jsonl"), "--method", "sft"]) == 0
    (tmp_path / "w.jsonl").write_text((tmp_path / "w.jsonl").read_text().replace('"weight": 1.0', '"weight": 9.0', 1))
    capsys.readouterr()
    assert main(train_args(tiny_model_dir, str(tmp_path / "w.jsonl"), tmp_path / "t")) == 2
    assert error_lines(capsys)[-1] == (f"drift train: error: {tmp_path / 'w.jsonl'}: damaged weighted rows: w.jsonl "
                                       "differs from the file its record vouches for (sha256); write them again with "
                                       "drift weights")


def test_a_damaged_rollout_is_refused_by_its_readers_and_resume_samples_it_again(tmp_path, capsys, caplog,
                                                                                 tiny_model_dir):
    rollout = tmp_path / "r"
    tasks = write_tasks(tmp_path / "tasks.jsonl", "exact")
    args = ["rollout", "--model", str(tiny_model_dir), "--tasks", tasks, "--output", str(rollout), "--n", "2",
            "--max-turns", "1", "--max-new-tokens", "4", "--temperature", "1.0"]
    assert main(args) == 0
    shard = rollout / "trajectories/shard-00000.jsonl"
    files = json.loads((rollout / "manifest.json").read_text())["files"]
    assert set(files) == {"trajectories/shard-00000.jsonl"} and files["trajectories/shard-00000.jsonl"]["bytes"] > 0
    whole = shard.read_text().splitlines(keepends=True)
    keys = sorted(tuple(json.loads(x)[k] for k in ("prompt_id", "sample_idx")) for x in whole)
    for damage, said in [("".join(whole[:-1]), "trajectories/shard-00000.jsonl has "),  # cut at a line's end
                         ("".join(whole).replace('"sample_idx": 1', '"sample_idx": 7', 1),  # same size, edited
                          "trajectories/shard-00000.jsonl differs from the file its record vouches for (sha256)")]:
        shard.write_text(damage)
        capsys.readouterr()
        assert main(["weights", str(rollout), "--output", str(tmp_path / "w.jsonl")]) == 2
        line = error_lines(capsys)[-1]
        assert line.startswith(f"drift weights: error: {rollout}: damaged rollout: {said}"), line
        assert line.endswith("`drift rollout --resume` with the same settings samples those conversations again")
        assert main(["eval", "--trajectories", str(rollout), "--output", str(tmp_path / "e")]) == 2
        assert error_lines(capsys)[-1].startswith(f"drift eval: error: {rollout}: damaged rollout: {said}")
        assert not (tmp_path / "w.jsonl").exists() and not (tmp_path / "e/metrics.json").exists()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="drift"):
            assert main([*args, "--resume"]) == 0
        assert f"{rollout}: complete, but its files are damaged ({said}" in caplog.text
        again = sorted(tuple(json.loads(x)[k] for k in ("prompt_id", "sample_idx"))
                       for f in (rollout / "trajectories").glob("shard-*.jsonl") for x in f.read_text().splitlines())
        assert again == keys
        assert main(["weights", str(rollout), "--output", str(tmp_path / "w.jsonl")]) == 0
        (tmp_path / "w.jsonl").unlink()


def test_drift_run_redoes_a_stage_whose_model_was_truncated(tmp_path, caplog, tiny_model_dir):
    from test_pipeline import config

    data = config(tmp_path, tiny_model_dir, arms={"drift": {"method": "drift", "train": {"min_weight": 0.0}}})
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps(data))
    assert main(["run", str(cfg)]) == 0
    model = tmp_path / "run/train/drift/model.safetensors"
    whole = model.read_bytes()
    truncate(model)
    caplog.clear()
    caplog.set_level(logging.INFO, logger="drift")
    assert main(["run", str(cfg)]) == 0
    said = caplog.text
    assert "stage train/drift: complete, but its files are damaged (model.safetensors has" in said
    assert "stage train/drift: complete, skipped" not in said and "stage rollout: complete, skipped" in said
    assert model.stat().st_size == len(whole)


def test_a_finished_online_run_whose_model_was_truncated_saves_it_again(tmp_path, caplog, capsys, tiny_model_dir):
    from online_task import write_tasks as online_tasks

    out = tmp_path / "o"
    args = ["online", f"--model={tiny_model_dir}", f"--tasks={online_tasks(tmp_path / 'tasks.jsonl', 4)}",
            f"--output={out}", "--n=2", "--batch-prompts=2", "--max-turns=1", "--max-new-tokens=3", "--iterations=1",
            "--eval-every=0", "--dtype=float32", '--eval={"num_problems": 2, "max_new_tokens": 3}']
    assert main(args) == 0
    model = out / "model.safetensors"
    whole = model.read_bytes()
    truncate(model)
    capsys.readouterr()
    assert main(["eval", f"--model={out}", f"--output={tmp_path / 'e'}", "--tasks=mc-arith"]) == 2  # loaders refuse it
    assert error_lines(capsys)[-1].startswith(f"drift eval: error: {out}: damaged model: model.safetensors has ")
    caplog.set_level(logging.INFO, logger="drift")
    assert main(args) == 0  # the same command
    assert "complete, but its files are damaged (model.safetensors has" in caplog.text
    assert "already complete" not in caplog.text
    assert model.read_bytes() == whole and json.loads((out / "train_summary.json").read_text())["status"] == "complete"


# --- exact resumes -----------------------------------------------------------------------


def test_train_loss_after_a_resume_covers_the_whole_run(tmp_path, tiny_model_dir):
    out = tmp_path / "t"
    args = train_args(tiny_model_dir, weighted_rows(tmp_path / "w.jsonl"), out, "--max-steps", "4", "--save-steps", "1",
                      "--save-total-limit", "4")
    assert main(args) == 0
    whole = json.loads((out / "train_summary.json").read_text())
    losses = [h["loss"] for h in whole["history"]]
    assert len(losses) == 4 and whole["train_loss"] == pytest.approx(sum(losses) / 4, rel=1e-4)
    # killed after checkpoint 2 (3's record was never written), then resumed: steps 3 and 4 are redone
    (out / "checkpoint-3" / "drift_checkpoint.json").unlink()
    assert main([*args, "--resume-from-checkpoint", "latest"]) == 0
    resumed = json.loads((out / "train_summary.json").read_text())
    assert resumed["resumed_from"].endswith("checkpoint-2")
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-4)


def reference_rows(groups: int, n: int) -> list[dict]:
    return [{"prompt_id": f"p{g}", "sample_idx": i, "messages": [], "turn_rewards": {"t1": float((g + i) % 2)},
             "answer_norms": [str(i)], "format_penalty": 0.0, "t_star": 1 if (g + i) % 2 else None}
            for g in range(groups) for i in range(n)]


def test_the_weighted_file_is_in_canonical_order_whatever_the_completion_order(tmp_path):
    rows = reference_rows(3, 4)
    written = []
    shuffled = random.Random(1).sample(rows, len(rows))  # a resumed rollout's completion order
    assert shuffled != rows
    for name, order in [("in-order", rows), ("completed-otherwise", shuffled)]:
        src = tmp_path / f"{name}.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in order))
        assert main(["weights", str(src), "--output", str(tmp_path / f"{name}-w.jsonl")]) == 0
        written.append((tmp_path / f"{name}-w.jsonl").read_bytes())
    assert written[0] == written[1]
    keys = [(r["prompt_id"], r["sample_idx"]) for r in map(json.loads, written[0].decode().splitlines())]
    assert keys == sorted(keys)


def test_beta_auto_that_cannot_reach_its_target_says_so(tmp_path, caplog):
    src = tmp_path / "n2.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in reference_rows(3, 2)))  # n = 2: ESS/N >= 0.5
    with caplog.at_level(logging.WARNING, logger="drift.weights"):
        assert main(["weights", str(src), "--output", str(tmp_path / "w.jsonl"), "--beta", "auto"]) == 0
    assert "beta auto cannot reach the ESS/N target 0.25 on these groups: it took beta 0.0001" in caplog.text
    diag = json.loads((tmp_path / "w.weights.json").read_text())
    assert diag["ess_target_met"] is False and diag["ess_share_reached"] == pytest.approx(0.5)
    assert main(["weights", str(src), "--output", str(tmp_path / "w2.jsonl"), "--beta", "auto",
                 "--ess-target", "0.75"]) == 0
    assert json.loads((tmp_path / "w2.weights.json").read_text())["ess_target_met"] is True


# --- surprising defaults -----------------------------------------------------------------


def test_online_says_what_its_evaluations_cost_and_warns_on_the_training_split(tmp_path, caplog, tiny_model_dir):
    from online_task import write_tasks as online_tasks

    tasks = online_tasks(tmp_path / "tasks.jsonl", 4)
    args = ["online", f"--model={tiny_model_dir}", f"--tasks={tasks}", f"--output={tmp_path / 'o'}", "--n=2",
            "--batch-prompts=2", "--max-turns=1", "--max-new-tokens=3", "--iterations=1", "--eval-every=0",
            "--dtype=float32", '--eval={"split": "train", "max_new_tokens": 3}']
    with caplog.at_level(logging.INFO, logger="drift.online"):
        assert main(args) == 0
    said = caplog.text
    assert "online: the held-out evaluations (eval split 'train') score problems the arm trains on (split 'train')" in said
    assert "online: 1 held-out evaluation(s), each of " in said and """bound them with --eval '{"num_problems": N}'""" in said
    assert "each held-out evaluation (" in said and "will take about" in said


# --- messages that name the key ----------------------------------------------------------


def test_changing_an_arms_rounds_or_round_data_names_the_key(tmp_path, capsys, tiny_model_dir):
    from test_pipeline import config

    data = config(tmp_path, tiny_model_dir, arms={"drift": {"method": "drift", "train": {"min_weight": 0.0}}})
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps(data))
    assert main(["run", str(cfg)]) == 0
    stamp = (tmp_path / "run/eval/drift/metrics.json").read_bytes()
    for change, named in [({"rounds": 2}, "arms.drift.rounds: 1 -> 2"),
                          ({"rounds": 2, "round_data": "union"}, "arms.drift.round_data: 'continue' -> 'union', "
                                                                 "arms.drift.rounds: 1 -> 2")]:
        cfg.write_text(json.dumps({**data, "arms": {"drift": {**data["arms"]["drift"], **change}}}))
        capsys.readouterr()
        assert main(["run", str(cfg)]) == 2
        line = error_lines(capsys)[-1]
        assert f"eval/drift ({named})" in line and "an earlier stage was redone" not in line, line
    assert (tmp_path / "run/eval/drift/metrics.json").read_bytes() == stamp  # nothing touched


# --- one rule per shared setting ---------------------------------------------------------


@pytest.mark.parametrize("flags,message", [
    (["--kl", "matched", "--kl-coef", "-1"], "config key 'kl_coef' must be a finite number >= 0 (or none), got -1.0"),
    (["--kl", "ufo", "--kl-coef", "-1"], "config key 'kl_coef' must be a finite number >= 0 (or none), got -1.0"),
    (["--gamma", "0"], "config key 'gamma' must be in (0, 1], got 0.0"),
    (["--gamma", "2"], "config key 'gamma' must be in (0, 1], got 2.0"),
    (["--gamma", "-1"], "config key 'gamma' must be in (0, 1], got -1.0"),
    (["--negative-nll-cap", "-1"], "config key 'negative_nll_cap' must be a finite number >= 0 (or none), got -1.0"),
    (["--max-length", "0"], "config key 'max_length' must be >= 1, got 0"),
])
def test_online_checks_every_shared_setting_by_the_other_stages_rule(tmp_path, capsys, flags, message):
    out = tmp_path / "o"
    assert main(["online", "--tasks", "mc-arith", "--output", str(out), *flags]) == 2
    assert error_lines(capsys) == [f"drift online: error: {message}"]
    assert not out.exists()  # before anything was written (and before any model was loaded)
    stage = {"--gamma": ["weights", "x.jsonl", "--output", str(tmp_path / "w.jsonl")]}.get(flags[0])
    if stage is None and flags[0] in ("--negative-nll-cap", "--max-length"):
        stage = ["train", "--data", "x.jsonl", "--output", str(tmp_path / "t")]
    if stage:  # the stage that shares the setting says the same
        assert main([*stage, *flags]) == 2
        assert error_lines(capsys) == [f"drift {stage[0]}: error: {message}"]


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_beta_is_one_rule_in_weights_and_online(tmp_path, capsys, value):
    """DRIFT's beta (the online arm's kl = matched coefficient): the same rule and line in both
    stages; only the weights stage also takes auto."""
    rule = f"config key 'beta' must be a finite number > 0{{}}, got {float(value)}"
    assert main(["online", "--tasks", "mc-arith", "--output", str(tmp_path / "o"), "--kl", "matched",
                 "--beta", value]) == 2
    assert error_lines(capsys) == [f"drift online: error: {rule.format('')}"]
    assert main(["weights", "x.jsonl", "--output", str(tmp_path / "w.jsonl"), "--beta", value]) == 2
    assert error_lines(capsys) == [f"drift weights: error: {rule.format(' or auto')}"]
    assert not (tmp_path / "o").exists()


def test_a_failed_online_start_does_not_block_the_corrected_command(tmp_path, capsys, tiny_model_dir):
    from online_task import write_tasks as online_tasks

    out = tmp_path / "o"
    args = [f"--model={tiny_model_dir}", f"--output={out}", "--n=2", "--batch-prompts=2", "--max-turns=1",
            "--max-new-tokens=3", "--iterations=1", "--eval-every=0", "--dtype=float32", "--resume",
            '--eval={"num_problems": 2, "max_new_tokens": 3}']
    bad = online_tasks(tmp_path / "bad.jsonl", 4, checker="test_reliability:says_yes")
    assert main(["online", f"--tasks={bad}", *args]) == 2  # fails in its first rollout
    assert "returned 'yes' (str)" in error_lines(capsys)[-1]
    good = online_tasks(tmp_path / "good.jsonl", 4)
    assert main(["online", f"--tasks={good}", *args]) == 0
    assert json.loads((out / "train_summary.json").read_text())["status"] == "complete"
