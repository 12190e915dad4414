"""The checkers: each extracts the answer (`drift.checkers.extract`), reads it, and judges it
against the gold answer — `math` (math-verify, in a worker process), `numeric`, `choice`, `exact`,
and `module:function` (a user function, in a worker process). `get_checker` builds and caches them.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from fractions import Fraction
from functools import partial

from drift import DriftError
from drift.checkers.extract import (CHOICE_LETTERS, EXTRACT_MODES, canonical_text, compatible_text, extract_answer,
                                    find_letter, folded_text, last_number, normalize_answer, number_text, to_number)
from drift.checkers.pool import FunctionByName, default_check_workers, outcome_of, resolve_function, schedule

BUILTIN_CHECKERS = ("math", "numeric", "choice", "exact")
REL_TOL, ABS_TOL = Fraction(1, 10**6), Fraction(1, 10**9)  # numeric checker tolerance

Verdict = str | Callable[[], str]  # a status now, or a function that waits for a worker's


@dataclass
class CheckResult:
    status: str  # "correct" | "wrong" | "unparseable" | "timeout"
    answer: str | None  # the extracted answer (None if unparseable)
    answer_norm: str | None  # normalize_answer(answer)


@dataclass
class PendingCheck:
    """A check under way (`Checker.submit`); `result()` waits for its verdict if a worker computes it."""

    answer: str | None  # the checker's reading of the extracted answer (None: unparseable)
    verdict: Verdict

    def result(self) -> CheckResult:
        status = self.verdict if isinstance(self.verdict, str) else self.verdict()
        if status == "unparseable":
            return CheckResult(status, None, None)
        return CheckResult(status, self.answer, normalize_answer(self.answer))


class Checker:
    """Extracts the answer (mode fixed at construction), reads it, and judges it against gold.

    `workers` is the size of the process pool that worker-bound checks (math-verify, user
    functions) run in; other checkers ignore it.
    """

    name = "checker"

    def __init__(self, extract: str = "auto", timeout: float = 5.0, workers: int | None = None):
        if extract not in EXTRACT_MODES:
            raise DriftError(f"unknown answer extraction mode {extract!r} (valid: {', '.join(EXTRACT_MODES)})")
        if not timeout > 0:
            raise DriftError(f"check timeout must be > 0 seconds, got {timeout}")
        if workers is not None and workers < 1:
            raise DriftError(f"check workers must be >= 1, got {workers}")
        self.extract = extract
        self.timeout = float(timeout)
        self.workers = workers or default_check_workers()

    def check(self, response: str, gold: str) -> CheckResult:
        return self.submit(response, gold).result()

    def check_many(self, items: Sequence[tuple[str, str]]) -> list[CheckResult]:
        """Check (response, gold) pairs: every worker-bound check is submitted before any is awaited."""
        pending = [self.submit(response, gold) for response, gold in items]
        return [p.result() for p in pending]

    def submit(self, response: str, gold: str) -> PendingCheck:
        """Extract and read the answer and start judging it (in a worker process if it needs one).

        Response and gold are read in Unicode NFC (`canonical_text`): composed and decomposed
        spellings of the same text are the same answer to every checker, user functions included."""
        raw = extract_answer(canonical_text(response), self.extract)
        answer = self.read(raw) if raw is not None else None
        gold = canonical_text(str(gold))
        return PendingCheck(answer, self.judge(answer, gold) if answer is not None else "unparseable")

    def check_golds(self, golds: Sequence[tuple[str, str]]) -> None:
        """Raise DriftError naming the first (problem id, gold answer) this checker cannot judge against."""
        for (problem_id, _), error in zip(golds, self.gold_errors([canonical_text(str(gold)) for _, gold in golds])):
            if error is not None:
                raise DriftError(f"problem {problem_id!r}: {error}")

    def gold_errors(self, golds: list[str]) -> list[str | None]:
        """Why each gold answer cannot be judged against (None: it can)."""
        return [self.gold_error(gold) for gold in golds]

    def gold_error(self, gold: str) -> str | None:
        return None

    def read(self, answer: str) -> str | None:
        """The checker's reading of an extracted answer (a number, a letter, ...); None: unreadable."""
        return answer

    def judge(self, answer: str, gold: str) -> Verdict:
        raise NotImplementedError


class NumericChecker(Checker):
    """Numbers equal within relative 1e-6 or absolute 1e-9; the answer's last number is read."""

    name = "numeric"

    def read(self, answer: str) -> str | None:
        return number_text(answer) or last_number(answer)

    def gold_error(self, gold: str) -> str | None:
        return None if to_number(gold) is not None else f"numeric checker: gold answer {gold!r} is not a number"

    def judge(self, answer: str, gold: str) -> str:
        g = to_number(gold)
        if g is None:
            raise DriftError(self.gold_error(gold))
        a = to_number(answer)
        if a is None:
            return "unparseable"
        return "correct" if abs(a - g) <= max(REL_TOL * max(abs(a), abs(g)), ABS_TOL) else "wrong"


class ChoiceChecker(Checker):
    """Multiple choice: the answer's letter (A-D) against the gold letter, case-insensitive; both
    read in NFKC (a full-width `Ｂ` is `B`)."""

    name = "choice"

    def read(self, answer: str) -> str | None:
        return find_letter(compatible_text(answer))

    def gold_error(self, gold: str) -> str | None:
        if find_letter(compatible_text(gold)) is not None:
            return None
        return f"choice checker: gold answer {gold!r} is not a choice letter ({', '.join(CHOICE_LETTERS)})"

    def judge(self, answer: str, gold: str) -> str:
        g = find_letter(compatible_text(gold))
        if g is None:
            raise DriftError(self.gold_error(gold))
        return "correct" if answer == g else "wrong"


class ExactChecker(Checker):
    """Strings equal after `folded_text` (Unicode NFKC, case-folded, no whitespace), one trailing
    period ignored."""

    name = "exact"

    def judge(self, answer: str, gold: str) -> str:
        same = folded_text(answer).removesuffix(".") == folded_text(gold).removesuffix(".")
        return "correct" if same else "wrong"


_PLAIN_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


class MathChecker(Checker):
    """math-verify equivalence, run in a worker process.

    Fast path without a worker: equal normalized strings are correct; two plain decimal numbers
    ("1,000", "-2.50") are compared here, integers exactly and decimals after rounding to 6
    places (math-verify's float_rounding). Gold answers that are numbers are readable as they
    are; any other gold is parsed once by math-verify (`gold_errors`).
    """

    name = "math"

    def judge(self, answer: str, gold: str) -> Verdict:
        if normalize_answer(answer) == normalize_answer(gold):
            return "correct"
        a, g = answer.strip().rstrip("."), gold.strip()
        if _PLAIN_NUMBER.fullmatch(a) and _PLAIN_NUMBER.fullmatch(g):
            x, y = Fraction(a.replace(",", "")), Fraction(g.replace(",", ""))
            same = x == y if "." not in a + g else round(x, 6) == round(y, 6)
            return "correct" if same else "wrong"
        return partial(self._status, self._in_worker(math_verdict, gold, answer))

    def gold_errors(self, golds: list[str]) -> list[str | None]:
        """Numbers need no parse; every other distinct gold is parsed by math-verify, all at once."""
        futures = {g: self._in_worker(math_gold_status, g) for g in set(golds) if to_number(g) is None}
        statuses = {g: self._status(f) for g, f in futures.items()}
        return [self._gold_error(g, statuses.get(g, "ok")) for g in golds]

    def _gold_error(self, gold: str, status: str) -> str | None:
        if status == "unparseable":
            return f"math checker: math-verify cannot parse the gold answer {gold!r}"
        if status == "timeout":
            return f"math checker: math-verify did not parse the gold answer {gold!r} within {self.timeout:g} s"
        return None

    def _in_worker(self, fn: Callable[..., str], *args: str) -> Future:
        # math-verify's own SIGALRM limit, in whole seconds, for each parse and the comparison
        return schedule(self.workers, fn, (*args, max(1, int(self.timeout))), self.timeout)

    def _status(self, future: Future) -> str:
        outcome, value = outcome_of(future)
        if outcome == "error":
            raise DriftError(f"math checker: math-verify failed in its worker process ({value})")
        return value if outcome == "ok" else "timeout"


def _as_latex(s: str) -> str:
    """Wrap a bare answer in `$..$` so math-verify's LaTeX extraction sees it."""
    if re.search(r"\\(?:boxed|fbox|\(|\[)|(?<!\\)\$", s):
        return s
    return f"${s}$"


def math_verdict(gold: str, answer: str, seconds: int) -> str:
    """(worker side) correct / wrong / unparseable / timeout by math-verify, gold first.

    `seconds` is math-verify's own SIGALRM limit for each parse and the comparison.
    """
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    try:
        try:
            pred = parse(_as_latex(answer), parsing_timeout=seconds, raise_on_error=True)
        except Exception:
            return "unparseable"
        if not pred:
            return "unparseable"
        try:
            gold_parsed = parse(_as_latex(gold), parsing_timeout=seconds, raise_on_error=True)
            same = bool(gold_parsed) and verify(gold_parsed, pred, timeout_seconds=seconds, raise_on_error=True)
        except Exception:
            return "wrong"
        return "correct" if same else "wrong"
    except TimeoutException:
        return "timeout"


def math_gold_status(gold: str, seconds: int) -> str:
    """(worker side) "ok" if math-verify reads `gold` as math, else "unparseable" or "timeout".

    A parse that yields only the input string (no expression) is unparseable: every answer
    but the identical string would be judged wrong against it.
    """
    from math_verify import parse
    from math_verify.errors import TimeoutException

    try:
        parsed = parse(_as_latex(gold), parsing_timeout=seconds, raise_on_error=True)
    except TimeoutException:
        return "timeout"
    except Exception:
        return "unparseable"
    return "ok" if any(not isinstance(p, str) for p in parsed) else "unparseable"


class FunctionChecker(Checker):
    """A user function `module:function` called as fn(answer, gold) in a worker process.

    It receives the extracted answer and the gold answer in Unicode NFC and must return True
    (correct), False (wrong) or None (unparseable). Any other value (`"yes"`, `[False]`, 1,
    numpy's bool: wrap it in `bool(...)`) is not taken by its truth: the check raises DriftError naming the
    function and the value. It runs under the same outer timeout as math-verify; if it raises,
    the check raises DriftError naming the function.
    """

    def __init__(self, spec: str, extract: str = "auto", timeout: float = 5.0, workers: int | None = None):
        super().__init__(extract, timeout, workers)
        self.name = spec
        resolve_function(spec)  # fail early, in the caller's process, on a bad module or name

    def judge(self, answer: str, gold: str) -> Verdict:
        return partial(self._status, schedule(self.workers, FunctionByName(self.name), (answer, gold), self.timeout))

    def _status(self, future: Future) -> str:
        outcome, value = outcome_of(future)
        if outcome == "error":
            raise DriftError(f"custom checker {self.name} failed: {value}")
        if outcome == "timeout":
            return "timeout"
        if value is None:
            return "unparseable"
        if isinstance(value, bool):
            return "correct" if value else "wrong"
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise DriftError(f"custom checker {self.name} returned {shown} ({type(value).__name__}); it must return "
                         "True (correct), False (wrong) or None (unparseable)")


_CHECKERS: dict[tuple[str, str, float, int], Checker] = {}
_CHECKERS_LOCK = threading.Lock()


def get_checker(name: str, extract: str = "auto", timeout: float = 5.0, workers: int | None = None) -> Checker:
    """The checker `name` (math, numeric, choice, exact, or module:function); cached per arguments.

    `workers`: processes in the pool its worker-bound checks run in (None: `default_check_workers()`).
    """
    key = (name, extract, float(timeout), default_check_workers() if workers is None else workers)
    with _CHECKERS_LOCK:
        if key not in _CHECKERS:
            classes = {c.name: c for c in (MathChecker, NumericChecker, ChoiceChecker, ExactChecker)}
            if name in classes:
                _CHECKERS[key] = classes[name](extract, timeout, workers)
            elif ":" in name:
                _CHECKERS[key] = FunctionChecker(name, extract, timeout, workers)
            else:
                raise DriftError(f"unknown checker {name!r} (valid: {', '.join(BUILTIN_CHECKERS)}, or module:function)")
        return _CHECKERS[key]
