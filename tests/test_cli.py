"""The real `drift` CLI, run as a subprocess: output files, exit codes, one-line errors."""

import json
import subprocess
import sys

import pytest


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
    (["weights", "x", "--output", "o", "--beta", "abc"], "config key 'beta' expects float, got 'abc'"),
    (["weights", "x", "--output", "o", "--set", "bta=1"], "unknown config key 'bta' (did you mean beta?)"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    r = drift(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"drift weights: error: {message}"]


def test_unknown_method_rejected_by_parser():
    r = drift("weights", "x", "--output", "o", "--method", "ppo")
    assert r.returncode == 2 and "invalid choice: 'ppo'" in r.stderr
