"""The real `drift` CLI, as a subprocess and in process (`drift.cli.main`): output files, exit codes,
one-line errors."""

import json
import socket
import subprocess
import sys

import pytest
import torch.distributed as dist

from drift.cli import COMMANDS, main


def drift(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "drift.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_weights_command_on_reference_format(tmp_path):
    rows = [
        {"prompt_id": "p", "messages": [], "turn_rewards": {"t1": 0, "t2": 1}, "answer_norms": ["1", "2"],
         "format_penalty": 0.0, "verifier": {"t1": 0, "t2": 1}, "t_star": 2},
        {"prompt_id": "p", "messages": [], "turn_rewards": {"t1": 0, "t2": 0}, "answer_norms": ["1", "3"],
         "format_penalty": 0.0, "verifier": {"t1": 0, "t2": 0}, "t_star": None},
    ]
    inp = tmp_path / "ref.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "w.jsonl"
    r = drift("weights", str(inp), "--output", str(out), "--method", "rft")
    assert r.returncode == 0, r.stderr
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [g["weight"] for g in got] == [1.0, 0.0]
    assert [g["return"] for g in got] == pytest.approx([0.9, 0.0])
    assert "degenerate groups" in r.stdout
    diag = json.loads((tmp_path / "w.weights.json").read_text())
    assert diag["method"] == "rft" and diag["rows"] == 2


def test_config_file_and_flag_override(tmp_path):
    inp = tmp_path / "ref.jsonl"
    inp.write_text(json.dumps({"prompt_id": "p", "turn_rewards": {"t1": 1}}) + "\n"
                   + json.dumps({"prompt_id": "p", "turn_rewards": {"t1": 0}}) + "\n")
    cfg = tmp_path / "w.toml"
    cfg.write_text(f'input = "{inp}"\noutput = "{tmp_path / "w.jsonl"}"\nmethod = "sft"\nbeta = 0.5\n')
    r = drift("weights", "--config", str(cfg), "--method", "drift")
    assert r.returncode == 0, r.stderr
    diag = json.loads((tmp_path / "w.weights.json").read_text())
    assert diag["method"] == "drift" and diag["beta"] == 0.5


@pytest.mark.parametrize("args,message", [
    (["weights", "/nope/in.jsonl", "--output", "o.jsonl"], "input not found: /nope/in.jsonl"),
    (["weights", "x", "--output", "o", "--beta", "abc"], "config key 'beta' expects float or 'auto', got 'abc'"),
    (["weights", "x", "--output", "o", "--set", "bta=1"], "unknown config key 'bta' (did you mean beta?)"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    r = drift(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"drift weights: error: {message}"]


def test_unknown_method_rejected_by_parser():
    r = drift("weights", "x", "--output", "o", "--method", "ppo")
    assert r.returncode == 2 and "invalid choice: 'ppo'" in r.stderr


# --- in process: drift.cli.main --------------------------------------------------------------


def fails_with_one_line(capsys, tmp_path, argv, message):
    """Exit 2, exactly `drift CMD: error: MESSAGE` on stderr, no traceback, no temp file left."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"drift {argv[0]}: error: {message}"]
    assert not list(tmp_path.rglob("*.tmp"))


SUBCOMMANDS = ["rollout", "weights", "train", "online", "eval", "compare", "run", "demo", "stats", "inspect"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_takes_config_and_set(capsys, command):
    """The README's promise, for every subcommand (compare and run included)."""
    assert sorted(COMMANDS) == sorted(SUBCOMMANDS)
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--config CONFIG" in out and "--set KEY=VALUE" in out


def test_run_takes_its_config_file_as_positional_or_with_config(capsys, tmp_path, monkeypatch):
    import drift.pipeline

    seen = []
    monkeypatch.setattr(drift.pipeline, "run_pipeline", lambda cfg: seen.append(cfg) or "report")
    f = tmp_path / "run.toml"
    f.write_text(f'output = "{tmp_path / "r"}"\n')
    assert main(["run", "--config", str(f)]) == 0
    assert main(["run", str(f)]) == 0
    assert [(c.output, c.config_path) for c in seen] == [(str(tmp_path / "r"), str(f))] * 2
    assert capsys.readouterr().out == "report\nreport\n"
    fails_with_one_line(capsys, tmp_path, ["run", str(f), "--config", str(f)],
                        f"two config files ({f} and --config {f}): give one")


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_weights_refuses_a_non_finite_beta(capsys, tmp_path, value):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt_id": "p", "turn_rewards": {"t1": 1}}) + "\n")
    fails_with_one_line(capsys, tmp_path, ["weights", str(inp), "--output", str(tmp_path / "w.jsonl"), "--beta", value],
                        f"config key 'beta' must be a finite number > 0 or auto, got {value}")


def test_an_output_of_the_wrong_kind_is_one_line_before_any_work(capsys, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt_id": "p", "turn_rewards": {"t1": 1}}) + "\n")
    (tmp_path / "adir").mkdir()
    fails_with_one_line(capsys, tmp_path, ["weights", str(inp), "--output", str(tmp_path / "adir")],
                        f"output {tmp_path / 'adir'} is a directory; give a file path")
    fails_with_one_line(capsys, tmp_path, ["eval", "--trajectories", str(inp), "--output", str(inp)],
                        f"output {inp} exists and is not a directory")
    fails_with_one_line(capsys, tmp_path, ["rollout", "--model", "no-such/model", "--tasks", "arith",
                                           "--num-problems", "1", "--output", str(inp / "run")],
                        f"cannot write to {inp / 'run'}: Not a directory")


@pytest.mark.parametrize("content,message", [
    (b'{"id": "a", "question": "\xe9", "answer": "1"}\n', "t.jsonl:1: not UTF-8 text (byte 0xe9 at column 26)"),
    (b'{"id": "a", "question": ["q"], "answer": "1"}\n', "t.jsonl:1: field 'question' must be a string, got list"),
    (b'{"id": "a", "question": "q", "answer": {"x": 1}}\n',
     "t.jsonl:1: field 'answer' must be a string or a number, got dict"),
])
def test_bad_task_files_are_one_line(capsys, tmp_path, content, message):
    tasks = tmp_path / "t.jsonl"
    tasks.write_bytes(content)
    fails_with_one_line(capsys, tmp_path, ["rollout", "--model", "no-such/model", "--tasks", str(tasks),
                                           "--output", str(tmp_path / "out")], f"{tmp_path}/{message}")
    assert not (tmp_path / "out").exists()


def test_a_parquet_task_file_that_is_not_parquet(capsys, tmp_path):
    tasks = tmp_path / "t.parquet"
    tasks.write_text("id,question,answer\na,q,1\n")
    assert main(["rollout", "--model", "no-such/model", "--tasks", str(tasks), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"drift rollout: error: {tasks}: not a readable Parquet file")


def test_a_directory_without_a_model(capsys, tmp_path):
    (tmp_path / "m").mkdir()
    fails_with_one_line(capsys, tmp_path, ["eval", "--model", str(tmp_path / "m"), "--tasks", "arith",
                                           "--num-problems", "1", "--output", str(tmp_path / "e")],
                        f"{tmp_path / 'm'}: not a model directory (no config.json)")


@pytest.fixture
def one_rank_group(monkeypatch):
    """This process as the only rank of a gloo group (what `accelerate launch` sets up in each
    process), with the barrier recorded."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    calls = []
    barrier = dist.barrier
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: (calls.append("barrier"), barrier(*a, **k)))
    yield calls
    if dist.is_initialized():
        dist.destroy_process_group()


def _reference_rows(path):
    path.write_text(json.dumps({"prompt_id": "p", "turn_rewards": {"t1": 1}}) + "\n"
                    + json.dumps({"prompt_id": "p", "turn_rewards": {"t1": 0}}) + "\n")
    return str(path)


def test_every_rank_meets_at_a_barrier_before_the_group_is_torn_down(tmp_path, one_rank_group):
    assert main(["weights", _reference_rows(tmp_path / "ref.jsonl"), "--output", str(tmp_path / "w.jsonl")]) == 0
    assert one_rank_group == ["barrier"] and not dist.is_initialized()


def test_a_failed_rank_tears_its_group_down_without_waiting(tmp_path, one_rank_group):
    assert main(["weights", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "w.jsonl")]) == 2
    assert one_rank_group == [] and not dist.is_initialized()


def test_stats_prints_the_test_and_refuses_bad_counts(capsys, tmp_path):
    assert main(["stats", "--test", "fisher", "8/24", "15/204"]) == 0
    assert capsys.readouterr().out == "8/24 against 15/204: Fisher's exact test, two-sided p = 0.00081\n"
    fails_with_one_line(capsys, tmp_path, ["stats", "--test", "wilson", "9/8"], "'9/8': needs 0 <= K <= N")
