"""Answer extraction: the final answer of a response (`extract_answer`), and the readings of it
the checkers compare: a number (`last_number`, `to_number`), a choice letter (`find_letter`), the
normalized string (`normalize_answer`). `<think>...</think>` reasoning is dropped first.
"""

from __future__ import annotations

import re
import unicodedata
from fractions import Fraction

from drift import DriftError

EXTRACT_MODES = ("auto", "answer_tag", "boxed", "number", "letter", "last_line", "full")
CHOICE_LETTERS = "ABCD"
SHORT_ANSWER_CHARS = 64  # `auto` takes the whole response as the answer only up to this length


def canonical_text(s: str) -> str:
    """`s` in Unicode NFC: one spelling for canonically equal text (`café` composed or as `e` +
    combining accent), so no checker tells them apart. Every checker reads responses and gold
    answers through it; NFC changes no character's meaning (NFKC would turn `x²` into `x2`)."""
    return unicodedata.normalize("NFC", s)


def normalize_answer(s: str) -> str:
    """NFC, lower-case, all whitespace removed (answers are compared this way for uniqueness)."""
    return re.sub(r"\s+", "", canonical_text(s).lower())


def compatible_text(s: str) -> str:
    """`s` in Unicode NFKC: compatibility forms folded (full-width `Ｂ` is `B`, the ligature `ﬁ` is
    `fi`). The choice and exact checkers read answers this way; math and numeric do not (`x²`)."""
    return unicodedata.normalize("NFKC", s)


def folded_text(s: str) -> str:
    """The exact checker's reading: NFKC (`compatible_text`), case-folded (`Straße` is `strasse`),
    all whitespace removed."""
    return re.sub(r"\s+", "", compatible_text(s).casefold())


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


def number_text(s: str) -> str | None:
    """`s` as plain number text ("1,234." -> "1234", "\\frac{3}{4}" -> "3/4") if it is one number."""
    s = _clean_math(s).strip().strip("$").strip().rstrip(".").lstrip("+")
    return s.replace(",", "") if _NUMBER.fullmatch(s) else None


def to_number(s: str) -> Fraction | None:
    """`s` as an exact number if it is one ("1,234", "-2.5", "3/4", "\\frac{3}{4}", "1e-3", "42.")."""
    text = number_text(s)
    if text is None:
        return None
    num, _, den = text.partition("/")
    try:
        return Fraction(num) / Fraction(den or 1)
    except (ValueError, ZeroDivisionError):
        return None
