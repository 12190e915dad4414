"""Reliability through the real CLI (`drift.cli.main`): a custom checker's answer must be a bool,
a full disk and a damaged output are one clear line with nothing lost, and resumes are exact.

The checker functions below are imported by name (`test_reliability:fn`) in checker workers.
"""

from __future__ import annotations

import json

import pytest

from drift.cli import main


def says_yes(answer: str, gold: str) -> str:
    return "yes"


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
