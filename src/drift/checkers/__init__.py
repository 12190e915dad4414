"""Answer extraction and verification.

`extract_answer(text, mode)` pulls the final answer out of a response (after dropping
`<think>...</think>`); `get_checker(name, extract, timeout, workers).check(response, gold)`
extracts and judges it, returning a `CheckResult` whose status is one of:

- correct / wrong: the verifier's verdict;
- unparseable: no answer could be extracted (or read as a number / letter / formula);
- timeout: no verdict within `timeout` seconds (or the worker process died).

Checkers: `math` (math-verify), `numeric`, `choice`, `exact`, and `module:function` (a user
function `fn(answer: str, gold: str) -> bool | None` called with the extracted answer; use
`extract="full"` to receive the whole response instead). A user function must return a bool or
None: any other value is an error naming the function and the value, never a verdict by its truth.

Unicode: responses and gold answers are read in NFC, so composed and decomposed spellings (`café`)
are one answer to every checker; `exact` and `choice` also fold compatibility forms (NFKC:
full-width letters and digits, ligatures) and `exact` case-folds. `math` and `numeric` keep NFC
only: NFKC would read `x²` as `x2`.

math-verify and user functions run in a pool of worker processes (pebble): math-verify's own
timeouts use SIGALRM, which only works in the main thread, and a stuck sympy call or user
function can only be stopped by killing its process. Each check has an outer timeout; on
expiry the worker is killed and replaced. `check_many` (or `submit` then `result()`) puts a
whole batch of checks into the pool before waiting for any. The math checker decides without a
worker when the normalized strings are equal or both sides are plain decimal numbers (the
common case for arithmetic answers).

`check_golds` tells, before any answer is checked, whether each gold answer can be judged
against: a number for `numeric`, a letter for `choice`, something math-verify parses for `math`.

Modules: `extract` (answer extraction and reading), `checker` (the checkers and `get_checker`),
`pool` (the worker processes). What other stages use is exported here.
"""

from __future__ import annotations

from drift.checkers.checker import BUILTIN_CHECKERS, Checker, CheckResult, get_checker
from drift.checkers.extract import EXTRACT_MODES, extract_answer, last_boxed, normalize_answer

__all__ = ["BUILTIN_CHECKERS", "EXTRACT_MODES", "CheckResult", "Checker", "extract_answer", "get_checker", "last_boxed",
           "normalize_answer"]
