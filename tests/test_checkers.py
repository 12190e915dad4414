"""Answer extraction and checkers: a golden set of gold/response pairs plus the worker pool.

The custom-checker functions below are imported by name (`{__name__}:fn`) in the worker processes.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from drift import DriftError, checkers
from drift.checkers import CheckResult, extract_answer, get_checker, last_boxed, normalize_answer

GOLDEN = [json.loads(line) for line in (Path(__file__).parent / "data" / "checker_golden.jsonl").read_text().splitlines()]


def is_even(answer: str, gold: str) -> bool | None:
    return None if not answer.isdigit() else int(answer) % 2 == 0


def sleepy(answer: str, gold: str) -> bool:
    """Leave this process's id in the file `gold`, then sleep past any test's timeout."""
    Path(gold).write_text(str(os.getpid()))
    time.sleep(30)
    return True


def dies(answer: str, gold: str) -> bool:
    os._exit(3)


def rendezvous(answer: str, gold: str) -> bool:
    """Arrive (a file named `answer` in the directory `gold`) and wait for two others: True if they came."""
    (Path(gold) / answer).touch()
    deadline = time.monotonic() + 30
    while len(list(Path(gold).iterdir())) < 3:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
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


def test_timeout_kills_the_worker_and_later_checks_work(tmp_path):
    pid_file = tmp_path / "pid"
    result = get_checker(spec(sleepy), "number", timeout=0.5).check("7", str(pid_file))
    assert result == CheckResult("timeout", "7", "7")
    assert not _alive(int(pid_file.read_text()))
    assert get_checker(spec(is_even), "number").check("It is 4", "x").status == "correct"
    assert get_checker("math").check(r"\boxed{\frac{2}{4}}", "0.5").status == "correct"


def test_a_worker_that_dies_is_a_timeout_and_the_pool_goes_on():
    assert get_checker(spec(dies)).check("7", "7") == CheckResult("timeout", "7", "7")
    assert get_checker(spec(is_even), "number").check("It is 5", "x").status == "wrong"


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


def test_check_many_runs_worker_checks_at_once(tmp_path):
    # each call waits for two others to arrive: one by one, none would see the others
    checker = get_checker(spec(rendezvous), "full", timeout=60, workers=3)
    assert [r.status for r in checker.check_many([(str(i), str(tmp_path)) for i in range(3)])] == ["correct"] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0", "1", "2"]


def test_check_many_equals_one_by_one():
    key = lambda c: (c["checker"], c["extract"], c.get("timeout", 5.0))  # noqa: E731
    for (name, extract, timeout), cases in itertools.groupby(sorted(GOLDEN, key=key), key=key):
        checker, pairs = get_checker(name, extract, timeout), [(c["response"], c["gold"]) for c in cases]
        assert checker.check_many(pairs) == [checker.check(response, gold) for response, gold in pairs]


def test_fast_path_needs_no_worker(monkeypatch):
    monkeypatch.setattr(checkers.checker, "schedule", lambda *args: pytest.fail("a check went to a worker"))
    checker = get_checker("math", "number")
    assert checker.check("The answer is 1,000.", "1000").status == "correct"
    assert checker.check("2.0000001", "2").status == "correct"  # rounded to 6 places
    assert checker.check("-7", "7").status == "wrong"
    checker.check_golds([("a", "1,000"), ("b", "-2.5"), ("c", r"\frac{3}{4}")])  # numbers: no parse


def test_unreadable_gold_names_its_problem():
    get_checker("math").check_golds([("p1", "42"), ("p2", r"x^2+\sqrt{2}"), ("p3", r"\text{yes}")])
    with pytest.raises(DriftError, match=r"^problem 'p9': math checker: math-verify cannot parse the gold answer '\?\?\?'$"):
        get_checker("math").check_golds([("p1", "7"), ("p9", "???"), ("p10", "")])
    with pytest.raises(DriftError, match=r"^problem 'n2': numeric checker: gold answer 'forty' is not a number$"):
        get_checker("numeric").check_golds([("n1", "40"), ("n2", "forty")])
    with pytest.raises(DriftError, match=r"^problem 'c1': choice checker: gold answer '42' is not a choice letter"):
        get_checker("choice").check_golds([("c1", "42")])
    get_checker("exact").check_golds([("e1", "anything")])


def test_worker_count_is_validated():
    with pytest.raises(DriftError, match="check workers must be >= 1, got 0"):
        get_checker("math", workers=0)


def says_yes(answer: str, gold: str) -> str:
    return "yes"


def false_in_a_list(answer: str, gold: str) -> list:
    return [False]


@pytest.mark.parametrize("fn,shown", [(says_yes, "'yes' (str)"), (false_in_a_list, "[False] (list)")])
def test_a_custom_function_that_returns_no_bool_is_an_error_naming_it(fn, shown):
    with pytest.raises(DriftError) as e:
        get_checker(spec(fn), "full").check("11.", "15")
    assert str(e.value) == (f"custom checker {spec(fn)} returned {shown}; it must return True (correct), "
                            "False (wrong) or None (unparseable)")


CAFE_NFC, CAFE_NFD = "caf\u00e9", "cafe\u0301"


@pytest.mark.parametrize("name,response,gold", [
    ("exact", CAFE_NFC, CAFE_NFD), ("exact", CAFE_NFD, CAFE_NFC), ("math", CAFE_NFD, CAFE_NFC),
    ("exact", "\uff22", "B"),  # full-width B (NFKC)
    ("exact", "Stra\u00dfe", "STRASSE"),  # case-folded
    ("choice", "The answer is \uff23", "C"),
    ("numeric", "\uff11\uff15", "15"),  # full-width digits
])
def test_every_text_checker_reads_unicode_normalized(name, response, gold):
    assert get_checker(name, "full" if name != "numeric" else "number").check(response, gold).status == "correct"


def test_a_custom_function_gets_nfc_text():
    assert get_checker(spec(is_cafe_nfc), "full").check(CAFE_NFD, CAFE_NFD).status == "correct"


def is_cafe_nfc(answer: str, gold: str) -> bool:
    return answer == gold == CAFE_NFC
