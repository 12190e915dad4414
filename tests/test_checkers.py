"""Answer extraction and checkers: a golden set of gold/response pairs plus the worker pool.

The custom-checker functions below are imported by name (`{__name__}:fn`) in the worker process.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from drift import DriftError
from drift.checkers import (CheckResult, extract_answer, get_checker, last_boxed, normalize_answer,
                            run_in_worker, shutdown_workers)

GOLDEN = [json.loads(line) for line in (Path(__file__).parent / "data" / "checker_golden.jsonl").read_text().splitlines()]


def is_even(answer: str, gold: str) -> bool | None:
    return None if not answer.isdigit() else int(answer) % 2 == 0


def sleepy(answer: str, gold: str) -> bool:
    time.sleep(30)
    return True


def explodes(answer: str, gold: str) -> bool:
    raise ValueError("no idea what to do with " + answer)


def spec(fn) -> str:
    return f"{__name__}:{fn.__name__}"


def test_golden_set_size_and_coverage():
    assert len(GOLDEN) >= 40
    assert {c["status"] for c in GOLDEN} == {"correct", "wrong", "unparseable", "timeout"}
    assert {c["checker"] for c in GOLDEN} == {"math", "numeric", "choice", "exact"}


@pytest.mark.parametrize("case", GOLDEN, ids=[f"{c['checker']}-{c['note']}" for c in GOLDEN])
def test_golden(case):
    checker = get_checker(case["checker"], case["extract"], case.get("timeout", 5.0))
    result = checker.check(case["response"], case["gold"])
    assert result.status == case["status"], result
    if case["answer"] is not None:
        assert result.answer == case["answer"]
        assert result.answer_norm == normalize_answer(case["answer"])
    if case["status"] == "unparseable":
        assert result.answer is None and result.answer_norm is None


def test_normalize_answer():
    assert normalize_answer("  New\tYork \n") == "newyork"


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{\frac{1}{2}} and then \boxed{x^{2}}", "x^{2}"),
    (r"\fbox{7}", "7"),
    (r"\boxed 5$", "5"),
    (r"\boxed{}", ""),
    (r"first \boxed{1} then \boxed{2", None),
    ("no box at all", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize("text, mode, expected", [
    ("<answer>1</answer> then <answer> 2 </answer>", "auto", "2"),
    (r"<answer>7</answer> \boxed{8}", "auto", "7"),
    (r"blah \boxed{8}", "auto", "8"),
    ("x" * 100, "auto", None),
    ("<think>\\boxed{1}</think>42", "auto", "42"),
    ("reasoning without the opening tag</think><answer>3</answer>", "answer_tag", "3"),
    ("<think>cut off while thinking <answer>3</answer>", "answer_tag", None),
    ("no tag", "answer_tag", None),
    (r"\boxed{3} and <answer>4</answer>", "boxed", "3"),
    ("The answer is 42.", "number", "42"),
    ("Total: $1,234,567.", "number", "1234567"),
    ("from 3-4 apples", "number", "4"),
    ("it is −3", "number", "-3"),
    ("x = .5", "number", ".5"),
    (r"<answer>\frac{3}{4}</answer> not 9", "number", "3/4"),
    ("no digits here", "number", None),
    ("B. 82", "letter", "B"),
    ("The answer is (C) 83", "letter", "C"),
    ("The answer is a bit unclear", "letter", None),
    ("Option A is too small, so the answer is C.", "letter", "C"),
    ("one\n\n  last line  \n", "last_line", "last line"),
    ("<think>x</think>  whole text \n", "full", "whole text"),
])
def test_extract_answer(text, mode, expected):
    assert extract_answer(text, mode) == expected


def test_get_checker_caches_and_validates():
    assert get_checker("numeric", "number") is get_checker("numeric", "number", 5.0)
    assert get_checker("numeric", "number") is not get_checker("numeric", "auto")
    with pytest.raises(DriftError, match="unknown checker 'nope'.*math, numeric, choice, exact"):
        get_checker("nope")
    with pytest.raises(DriftError, match="extraction mode 'xml'.*auto"):
        get_checker("exact", "xml")
    with pytest.raises(DriftError, match="cannot import module 'no_such_module_xyz'"):
        get_checker("no_such_module_xyz:f")
    with pytest.raises(DriftError, match="has no function 'missing'"):
        get_checker(f"{__name__}:missing")


def test_bad_gold_is_a_user_error():
    with pytest.raises(DriftError, match="gold answer 'forty' is not a number"):
        get_checker("numeric", "number").check("42", "forty")
    with pytest.raises(DriftError, match="gold answer '42' is not a choice letter"):
        get_checker("choice", "letter").check("B", "42")


def test_custom_function_verdicts():
    checker = get_checker(spec(is_even), "number")
    assert checker.check("It is 4", "x") == CheckResult("correct", "4", "4")
    assert checker.check("It is 5", "x").status == "wrong"
    assert checker.check("no number", "x").status == "unparseable"  # extraction failed: not called
    assert get_checker(spec(is_even), "full").check("four", "x") == CheckResult("unparseable", None, None)


def test_custom_function_that_raises_names_itself():
    with pytest.raises(DriftError) as err:
        get_checker(spec(explodes)).check("7", "7")
    message = str(err.value)
    assert message == f"custom checker {spec(explodes)} failed: ValueError: no idea what to do with 7"
    assert "Traceback" not in message and err.value.__cause__ is None


def test_timeout_kills_the_worker_and_later_checks_work():
    _, pid = run_in_worker("os:getpid", (), 5.0)
    start = time.monotonic()
    result = get_checker(spec(sleepy), timeout=0.5).check("7", "7")
    assert result == CheckResult("timeout", "7", "7")
    assert time.monotonic() - start < 10  # includes importing this module into the worker
    _, new_pid = run_in_worker("os:getpid", (), 5.0)
    assert new_pid != pid and not _alive(pid)
    assert get_checker("math").check(r"\boxed{\frac{2}{4}}", "0.5").status == "correct"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_checks_from_many_threads():
    checker = get_checker("math")
    cases = [(rf"\boxed{{\frac{{{n}}}{{{2 * n}}}}}", "0.5", "correct") for n in range(1, 9)]
    cases += [(rf"\boxed{{\sqrt{{{n * n + 1}}}}}", str(n), "wrong") for n in range(2, 10)]
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda c: checker.check(c[0], c[1]).status, cases))
    assert statuses == [c[2] for c in cases]


def test_shutdown_then_check_again():
    _, pid = run_in_worker("os:getpid", (), 5.0)
    shutdown_workers()
    assert not _alive(pid)
    assert get_checker("math").check(r"\boxed{2\pi}", r"\pi+\pi").status == "correct"
    shutdown_workers()


def test_fast_path_needs_no_worker():
    shutdown_workers()
    checker = get_checker("math", "number")
    assert checker.check("The answer is 1,000.", "1000").status == "correct"
    assert checker.check("2.0000001", "2").status == "correct"  # rounded to 6 places
    assert checker.check("-7", "7").status == "wrong"
    from drift import checkers

    assert not checkers._live
