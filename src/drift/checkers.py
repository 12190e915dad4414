"""Answer extraction and verification.

`extract_answer(text, mode)` pulls the final answer out of a response (after dropping
`<think>...</think>`); `get_checker(name, extract, timeout, workers).check(response, gold)`
extracts and judges it, returning a `CheckResult` whose status is one of:

- correct / wrong: the verifier's verdict;
- unparseable: no answer could be extracted (or read as a number / letter / formula);
- timeout: no verdict within `timeout` seconds (or the worker process died).

Checkers: `math` (math-verify), `numeric`, `choice`, `exact`, and `module:function` (a user
function `fn(answer: str, gold: str) -> bool | None` called with the extracted answer; use
`extract="full"` to receive the whole response instead).

math-verify and user functions run in a pool of worker processes (pebble): math-verify's own
timeouts use SIGALRM, which only works in the main thread, and a stuck sympy call or user
function can only be stopped by killing its process. Each check has an outer timeout; on
expiry the worker is killed and replaced. `check_many` (or `submit` then `result()`) puts a
whole batch of checks into the pool before waiting for any. The math checker decides without a
worker when the normalized strings are equal or both sides are plain decimal numbers (the
common case for arithmetic answers).

`check_golds` tells, before any answer is checked, whether each gold answer can be judged
against: a number for `numeric`, a letter for `choice`, something math-verify parses for `math`.
"""

from __future__ import annotations

import importlib
import os
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from fractions import Fraction
from functools import partial
from typing import Any

from drift import DriftError

EXTRACT_MODES = ("auto", "answer_tag", "boxed", "number", "letter", "last_line", "full")
BUILTIN_CHECKERS = ("math", "numeric", "choice", "exact")
CHOICE_LETTERS = "ABCD"
SHORT_ANSWER_CHARS = 64  # `auto` takes the whole response as the answer only up to this length
REL_TOL, ABS_TOL = Fraction(1, 10**6), Fraction(1, 10**9)  # numeric checker tolerance


# --- extraction ---------------------------------------------------------------------------


def normalize_answer(s: str) -> str:
    """Lower-case with all whitespace removed (answers are compared this way for uniqueness)."""
    return re.sub(r"\s+", "", s.lower())


def strip_think(text: str) -> str:
    """Drop reasoning: `<think>..</think>` blocks, an unclosed trailing `<think>`, and anything
    before a lone `</think>` (templates that open the think block in the prompt)."""
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.S)
    text = text.split("<think>")[0]
    return text.rsplit("</think>", 1)[-1]


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{..}` / `\\fbox{..}` (balanced braces), or None.

    Only the last one counts: if it is cut off (unbalanced), the answer is None rather than an
    earlier, possibly intermediate, box. `\\boxed 5` (no braces) gives "5".
    """
    starts = list(re.finditer(r"\\(?:boxed|fbox)\b", text))
    if not starts:
        return None
    i = starts[-1].end()
    rest = text[i:]
    if not rest.startswith("{"):
        m = re.match(r"\s+([^\s$]+)", rest)
        return m.group(1) if m else None
    depth = 0
    for j, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[1:j]
    return None


def _answer_tag(text: str) -> str | None:
    found = re.findall(r"<answer>(.*?)</answer>", text, flags=re.S | re.I)
    return found[-1].strip() if found else None


_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?:/\d+)?|(?<![\w.])-?\.\d+")
_FRAC = re.compile(r"\\[dt]?frac\{\s*(-?[\d.,]+)\s*\}\{\s*([\d.,]+)\s*\}")


def _clean_math(s: str) -> str:
    """LaTeX number spellings to plain ones: `\\frac{3}{4}` -> 3/4, `1{,}000` -> 1,000, unicode minus."""
    s = s.replace("\u2212", "-").replace("{,}", ",").replace("\\!", "").replace("\\,", "")
    return _FRAC.sub(r"\1/\2", s)


def last_number(text: str) -> str | None:
    """The last number in `text` as written, without thousands commas ("1,234." -> "1234")."""
    found = _NUMBER.findall(_clean_math(text))
    return found[-1].replace(",", "") if found else None


_LETTER = r"(?:\(([A-Da-d])\)|\[([A-Da-d])\]|\*\*([A-D])\*\*|([A-D])(?![\w])|([a-d])(?=[.):]|\s*$))"
_ANSWER_ANCHOR = re.compile(r"\b(?i:answer)\b(?:\s+(?i:is|would be|should be|will be))?[\s:=*]*(?:(?i:option|choice)\s*)?" + _LETTER)
_OPTION_ANCHOR = re.compile(r"\b(?i:option|choice)\s*" + _LETTER)
# Letters opening a line ("B. 82") and letters standing alone; "A" before a lower-case word is the article.
_LINE_LETTER = re.compile(r"^\s*[*_]*[(\[]?(?!A\s+[a-z])([A-D])[)\]]?[*_]*(?:[.):]|\s|$)", re.M)
_LONE_LETTER = re.compile(r"(?<![\w\\])(?!A\s+(?!is\b|was\b|seems\b|would\b|should\b)[a-z])([A-D])(?![\w])")


def _letter_of(match: re.Match) -> str:
    return next(g for g in match.groups() if g).upper()


def find_letter(text: str) -> str | None:
    """A single choice letter (A-D, upper-cased) that `text` gives as its answer, or None.

    In order: the whole text is one letter ("b", "(B)", "C."); the last "answer is X" /
    "Answer: X"; else, each in turn, "option X" mentions, letters opening lines ("B. 82") and
    letters standing alone: the first kind present decides if all its letters agree, else None.
    """
    text = text.strip()
    m = re.fullmatch(r"[*_]*[(\[]?([A-Da-d])[)\]]?[.:]?[*_]*", text)
    if m:
        return m.group(1).upper()
    answers = list(_ANSWER_ANCHOR.finditer(text))
    if answers:
        return _letter_of(answers[-1])
    for pattern in (_OPTION_ANCHOR, _LINE_LETTER, _LONE_LETTER):
        letters = {_letter_of(m) for m in pattern.finditer(text)}
        if len(letters) == 1:
            return letters.pop()
        if len(letters) > 1:
            return None
    return None


def extract_answer(text: str, mode: str) -> str | None:
    """The final answer in `text` according to `mode` (see EXTRACT_MODES), or None.

    auto: last `<answer>..</answer>`, else last `\\boxed{}`, else the whole text if at most
    SHORT_ANSWER_CHARS long. answer_tag / boxed: only that. number: the last number of the answer
    tag or box content, else of the whole text. letter: a choice letter (see `find_letter`), from
    the answer tag or box first. last_line: the last non-empty line. full: the whole text.
    `<think>` content is ignored in every mode; empty answers are None.
    """
    text = strip_think(text).strip()
    tagged, boxed = _answer_tag(text), last_boxed(text)
    if mode == "auto":
        answer = tagged if tagged is not None else boxed
        if answer is None and len(text) <= SHORT_ANSWER_CHARS:
            answer = text
    elif mode == "answer_tag":
        answer = tagged
    elif mode == "boxed":
        answer = boxed
    elif mode in ("number", "letter"):
        read = last_number if mode == "number" else find_letter
        answer = None
        for source in (tagged, boxed, text):
            answer = read(source) if source else None
            if answer:
                break
    elif mode == "last_line":
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        answer = lines[-1] if lines else None
    elif mode == "full":
        answer = text
    else:
        raise DriftError(f"unknown answer extraction mode {mode!r} (valid: {', '.join(EXTRACT_MODES)})")
    answer = answer.strip() if answer is not None else None
    return answer or None


# --- checkers ------------------------------------------------------------------------------

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
        """Extract and read the answer and start judging it (in a worker process if it needs one)."""
        raw = extract_answer(response, self.extract)
        answer = self.read(raw) if raw is not None else None
        return PendingCheck(answer, self.judge(answer, str(gold)) if answer is not None else "unparseable")

    def check_golds(self, golds: Sequence[tuple[str, str]]) -> None:
        """Raise DriftError naming the first (problem id, gold answer) this checker cannot judge against."""
        for (problem_id, _), error in zip(golds, self.gold_errors([str(gold) for _, gold in golds])):
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


def _number_text(s: str) -> str | None:
    """`s` as plain number text ("1,234." -> "1234", "\\frac{3}{4}" -> "3/4") if it is one number."""
    s = _clean_math(s).strip().strip("$").strip().rstrip(".").lstrip("+")
    return s.replace(",", "") if _NUMBER.fullmatch(s) else None


def to_number(s: str) -> Fraction | None:
    """`s` as an exact number if it is one ("1,234", "-2.5", "3/4", "\\frac{3}{4}", "1e-3", "42.")."""
    text = _number_text(s)
    if text is None:
        return None
    num, _, den = text.partition("/")
    try:
        return Fraction(num) / Fraction(den or 1)
    except (ValueError, ZeroDivisionError):
        return None


class NumericChecker(Checker):
    """Numbers equal within relative 1e-6 or absolute 1e-9; the answer's last number is read."""

    name = "numeric"

    def read(self, answer: str) -> str | None:
        return _number_text(answer) or last_number(answer)

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
    """Multiple choice: the answer's letter (A-D) against the gold letter, case-insensitive."""

    name = "choice"

    def read(self, answer: str) -> str | None:
        return find_letter(answer)

    def gold_error(self, gold: str) -> str | None:
        if find_letter(gold) is not None:
            return None
        return f"choice checker: gold answer {gold!r} is not a choice letter ({', '.join(CHOICE_LETTERS)})"

    def judge(self, answer: str, gold: str) -> str:
        g = find_letter(gold)
        if g is None:
            raise DriftError(self.gold_error(gold))
        return "correct" if answer == g else "wrong"


class ExactChecker(Checker):
    """Normalized strings equal (lower-case, no whitespace, one trailing period ignored)."""

    name = "exact"

    def judge(self, answer: str, gold: str) -> str:
        same = normalize_answer(answer).removesuffix(".") == normalize_answer(gold).removesuffix(".")
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

    It returns True (correct), False (wrong) or None (unparseable); any other value counts by
    its truth. It runs under the same outer timeout as math-verify; if it raises, the check
    raises DriftError naming the function.
    """

    def __init__(self, spec: str, extract: str = "auto", timeout: float = 5.0, workers: int | None = None):
        super().__init__(extract, timeout, workers)
        self.name = spec
        _resolve(spec)  # fail early, in the caller's process, on a bad module or name

    def judge(self, answer: str, gold: str) -> Verdict:
        return partial(self._status, schedule(self.workers, _ByName(self.name), (answer, gold), self.timeout))

    def _status(self, future: Future) -> str:
        outcome, value = outcome_of(future)
        if outcome == "error":
            raise DriftError(f"custom checker {self.name} failed: {value}")
        if outcome == "timeout":
            return "timeout"
        return "unparseable" if value is None else "correct" if value else "wrong"


def _resolve(spec: str) -> Any:
    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise DriftError(f"custom checker {spec!r}: expected the form module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise DriftError(f"custom checker {spec}: cannot import module {module_name!r} ({type(e).__name__}: {e})") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise DriftError(f"custom checker {spec}: module {module_name!r} has no function {func_name!r}")
    return fn


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


# --- worker processes ----------------------------------------------------------------------

_POOLS: dict[int, Any] = {}  # worker count -> its pebble.ProcessPool
_POOLS_LOCK = threading.Lock()


def default_check_workers() -> int:
    return min(4, os.cpu_count() or 1)


def schedule(workers: int, fn: Callable, args: tuple, timeout: float) -> Future:
    """Call fn(*args) in the pool of `workers` checker processes.

    The timeout counts from the moment a worker starts the call (waiting for a free worker is not
    counted); a worker that overruns it is killed and replaced, and the future raises TimeoutError.
    """
    return _pool(workers).schedule(fn, args, timeout=timeout)


def outcome_of(future: Future) -> tuple[str, Any]:
    """("ok", value), ("timeout", None) (over time, or its process died) or ("error", "ExcType: message")."""
    from concurrent.futures import TimeoutError as Overtime
    from concurrent.futures.process import BrokenProcessPool

    from pebble import ProcessExpired

    try:
        return "ok", future.result()
    except (Overtime, ProcessExpired):
        return "timeout", None
    except BrokenProcessPool as e:
        raise DriftError(f"checker worker processes stopped ({e}); a Python script that runs checks must "
                         "guard its entry point with `if __name__ == \"__main__\":`") from None
    except Exception as e:
        return "error", f"{type(e).__name__}: {e}"


def _pool(workers: int) -> Any:
    """The process-wide pool of `workers` checker processes, started on first use (again if it broke).

    Workers are spawned interpreters rather than forks of the caller: by the time answers are
    checked the caller runs torch's thread pools and the backend's threads, and a forked child
    inherits their locks in whatever state they were. Spawn imports the caller's main script
    under the name __mp_main__, so its `if __name__ == "__main__":` block does not run again.
    """
    import multiprocessing

    from pebble import ProcessPool

    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None or not pool.active:
            if pool is not None:
                pool.stop()
                pool.join()
            pool = _POOLS[workers] = ProcessPool(workers, initializer=_prepare_worker,
                                                 context=multiprocessing.get_context("spawn"))
        return pool


def _prepare_worker() -> None:
    """(worker side) Import math-verify once, so that its import is not part of a check's time."""
    import math_verify  # noqa: F401


class _ByName:
    """A user function sent to the workers by its `module:function` name.

    A worker imports it while it receives the task, which pebble does before it starts the
    task's timer, so a slow first import does not count as a slow check; an import that fails
    there comes back as the call's error.
    """

    def __init__(self, spec: str):
        self.spec = spec

    def __reduce__(self) -> tuple:
        return _load_function, (self.spec,)


def _load_function(spec: str) -> Callable:
    """(worker side) The function `spec`, or one that raises why it cannot be imported here."""
    try:
        return _resolve(spec)
    except DriftError as e:
        return partial(_raise, e)


def _raise(error: Exception, *args: Any) -> Any:
    raise error
