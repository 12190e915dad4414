"""Answer extraction and verification.

`extract_answer(text, mode)` pulls the final answer out of a response (after dropping
`<think>...</think>`); `get_checker(name, extract, timeout).check(response, gold)` extracts and
judges it, returning a `CheckResult` whose status is one of:

- correct / wrong: the verifier's verdict;
- unparseable: no answer could be extracted (or read as a number / letter / formula);
- timeout: no verdict within `timeout` seconds (or the worker process died).

Checkers: `math` (math-verify), `numeric`, `choice`, `exact`, and `module:function` (a user
function `fn(answer: str, gold: str) -> bool | None` called with the extracted answer; use
`extract="full"` to receive the whole response instead).

math-verify and user functions run in worker processes: math-verify's own timeouts use
SIGALRM, which only works in the main thread, and a stuck sympy call or user function can only
be stopped by killing its process. Each check has an outer timeout; on expiry the worker is
killed and a fresh one is started by the next check. The math checker decides without a worker
when the normalized strings are equal or both sides are plain decimal numbers (the common case
for arithmetic answers).
"""

from __future__ import annotations

import atexit
import importlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from fractions import Fraction
from multiprocessing.connection import Connection
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


@dataclass
class CheckResult:
    status: str  # "correct" | "wrong" | "unparseable" | "timeout"
    answer: str | None  # the extracted answer (None if unparseable)
    answer_norm: str | None  # normalize_answer(answer)


class Checker:
    """Extracts the answer (mode fixed at construction), reads it, and judges it against gold."""

    name = "checker"

    def __init__(self, extract: str = "auto", timeout: float = 5.0):
        if extract not in EXTRACT_MODES:
            raise DriftError(f"unknown answer extraction mode {extract!r} (valid: {', '.join(EXTRACT_MODES)})")
        if not timeout > 0:
            raise DriftError(f"check timeout must be > 0 seconds, got {timeout}")
        self.extract = extract
        self.timeout = float(timeout)

    def check(self, response: str, gold: str) -> CheckResult:
        raw = extract_answer(response, self.extract)
        answer = self.read(raw) if raw is not None else None
        status = self.judge(answer, str(gold)) if answer is not None else "unparseable"
        if status == "unparseable":
            return CheckResult(status, None, None)
        return CheckResult(status, answer, normalize_answer(answer))

    def read(self, answer: str) -> str | None:
        """The checker's reading of an extracted answer (a number, a letter, ...); None: unreadable."""
        return answer

    def judge(self, answer: str, gold: str) -> str:
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

    def judge(self, answer: str, gold: str) -> str:
        g = to_number(gold)
        if g is None:
            raise DriftError(f"numeric checker: gold answer {gold!r} is not a number")
        a = to_number(answer)
        if a is None:
            return "unparseable"
        return "correct" if abs(a - g) <= max(REL_TOL * max(abs(a), abs(g)), ABS_TOL) else "wrong"


class ChoiceChecker(Checker):
    """Multiple choice: the answer's letter (A-D) against the gold letter, case-insensitive."""

    name = "choice"

    def read(self, answer: str) -> str | None:
        return find_letter(answer)

    def judge(self, answer: str, gold: str) -> str:
        g = find_letter(gold)
        if g is None:
            raise DriftError(f"choice checker: gold answer {gold!r} is not a choice letter ({', '.join(CHOICE_LETTERS)})")
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
    places (math-verify's float_rounding).
    """

    name = "math"

    def judge(self, answer: str, gold: str) -> str:
        if normalize_answer(answer) == normalize_answer(gold):
            return "correct"
        a, g = answer.strip().rstrip("."), gold.strip()
        if _PLAIN_NUMBER.fullmatch(a) and _PLAIN_NUMBER.fullmatch(g):
            x, y = Fraction(a.replace(",", "")), Fraction(g.replace(",", ""))
            same = x == y if "." not in a + g else round(x, 6) == round(y, 6)
            return "correct" if same else "wrong"
        seconds = max(1, int(self.timeout))
        outcome, value = run_in_worker("drift.checkers:math_verdict", (gold, answer, seconds), self.timeout,
                                       preload=("math_verify",))
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


class FunctionChecker(Checker):
    """A user function `module:function` called as fn(answer, gold) in a worker process.

    It returns True (correct), False (wrong) or None (unparseable); any other value counts by
    its truth. It runs under the same outer timeout as math-verify; if it raises, the check
    raises DriftError naming the function.
    """

    def __init__(self, spec: str, extract: str = "auto", timeout: float = 5.0):
        super().__init__(extract, timeout)
        self.name = spec
        _resolve(spec)  # fail early, in the caller's process, on a bad module or name

    def judge(self, answer: str, gold: str) -> str:
        outcome, value = run_in_worker(self.name, (answer, gold), self.timeout)
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


_CHECKERS: dict[tuple[str, str, float], Checker] = {}
_CHECKERS_LOCK = threading.Lock()


def get_checker(name: str, extract: str = "auto", timeout: float = 5.0) -> Checker:
    """The checker `name` (math, numeric, choice, exact, or module:function); cached per arguments."""
    key = (name, extract, float(timeout))
    with _CHECKERS_LOCK:
        if key not in _CHECKERS:
            classes = {c.name: c for c in (MathChecker, NumericChecker, ChoiceChecker, ExactChecker)}
            if name in classes:
                _CHECKERS[key] = classes[name](extract, timeout)
            elif ":" in name:
                _CHECKERS[key] = FunctionChecker(name, extract, timeout)
            else:
                raise DriftError(f"unknown checker {name!r} (valid: {', '.join(BUILTIN_CHECKERS)}, or module:function)")
        return _CHECKERS[key]


# --- worker processes ----------------------------------------------------------------------

MAX_WORKERS = 2
STARTUP_TIMEOUT = 120.0  # seconds for a worker to start and import a function (not part of `timeout`)


def _serve(fd: int) -> None:
    """(worker main loop) Answer ("import", spec, modules) and ("call", spec, args) requests on `fd`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business; it kills us
    conn = Connection(fd)
    functions: dict[str, Any] = {}
    while True:
        try:
            op, spec, args = conn.recv()
        except (EOFError, OSError):
            return  # the parent closed the pipe or died
        try:
            if spec not in functions:
                functions[spec] = _resolve(spec)
            if op == "import":
                for module in args:
                    importlib.import_module(module)
                reply = ("ok", None)
            else:
                reply = ("ok", functions[spec](*args))
        except BaseException as e:  # reported to the caller, which raises DriftError
            reply = ("error", f"{type(e).__name__}: {e}")
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return
        except Exception as e:  # an unpicklable return value
            conn.send(("error", f"returned a value that cannot be sent back ({type(e).__name__}: {e})"))


class _Worker:
    """One worker process and its socket; remembers which functions it has imported.

    A fresh interpreter (`python -c`) rather than multiprocessing's spawn, which would re-run the
    caller's main script in the worker; the caller's sys.path is passed on as PYTHONPATH.
    """

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        fd = theirs.fileno()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.process = subprocess.Popen([sys.executable, "-c", f"from drift.checkers import _serve; _serve({fd})"],
                                        pass_fds=[fd], env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.loaded: set[str] = set()

    def request(self, op: str, spec: str, args: tuple, timeout: float) -> tuple[str, Any]:
        try:
            self.conn.send((op, spec, args))
            if not self.conn.poll(timeout):
                return "timeout", None
            return self.conn.recv()
        except (EOFError, OSError):
            return "timeout", None  # the process died

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(5)
        self.conn.close()


_pool_lock = threading.Lock()
_slots = threading.BoundedSemaphore(MAX_WORKERS)
_idle: list[_Worker] = []
_live: set[_Worker] = set()
_atexit_registered = False


def _acquire() -> _Worker:
    global _atexit_registered
    _slots.acquire()
    with _pool_lock:
        if _idle:
            return _idle.pop()
        if not _atexit_registered:
            atexit.register(shutdown_workers)
            _atexit_registered = True
    try:
        worker = _Worker()
    except BaseException:
        _slots.release()
        raise
    with _pool_lock:
        _live.add(worker)
    return worker


def _release(worker: _Worker, healthy: bool) -> None:
    with _pool_lock:
        if healthy and worker in _live:
            _idle.append(worker)
        else:
            _live.discard(worker)
    if not healthy:
        worker.kill()
    _slots.release()


def run_in_worker(spec: str, args: tuple, timeout: float, preload: tuple[str, ...] = ()) -> tuple[str, Any]:
    """Call the function `spec` (module:function) with `args` in a worker process.

    Returns ("ok", value), ("error", "ExcType: message") or ("timeout", None). Importing the
    function (and the `preload` modules) into a fresh worker is not counted in `timeout`. A worker
    that timed out is killed; the next call starts a new one.
    """
    worker = _acquire()
    healthy = False
    try:
        if spec not in worker.loaded:
            outcome, value = worker.request("import", spec, preload, STARTUP_TIMEOUT)
            if outcome != "ok":
                return outcome, value
            worker.loaded.add(spec)
        outcome, value = worker.request("call", spec, args, timeout)
        healthy = outcome != "timeout"
        return outcome, value
    finally:
        _release(worker, healthy)


def shutdown_workers() -> None:
    """Kill all checker worker processes (registered with atexit; later checks start new ones)."""
    with _pool_lock:
        workers = list(_live)
        _live.clear()
        _idle.clear()
    for worker in workers:
        worker.kill()
