"""A task a tiny random model can learn within a few steps, for the online arm's tests.

The checker (`online_task:first_char_even`, run by name in the checker's worker process) calls an
answer correct when its first character has an even code point: about half of a random model's
samples, so groups have return spread and the policy gradient has a signal.
"""

from __future__ import annotations

import json
from pathlib import Path

CHECKER = "online_task:first_char_even"


def first_char_even(answer: str, gold: str) -> bool | None:
    return ord(answer[0]) % 2 == 0 if answer else None


def never(answer: str, gold: str) -> bool:
    return False


def write_tasks(path: Path, n: int, checker: str = CHECKER) -> str:
    rows = [{"id": f"q{i}", "question": f"Say something about {i}.", "answer": "x", "checker": checker,
             "extract": "full"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)
