"""Resolve a TaskSpec to problems: built-in generators, local files, Hugging Face datasets."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from drift import DriftError
from drift.checkers import last_boxed
from drift.records import read_jsonl
from drift.tasks.code import NAME as CODE_TASKS
from drift.tasks.code import code_problem, generate_code
from drift.tasks.generators import GENERATORS, generate
from drift.tasks.problem import SPLITS, Problem, TaskSpec, split_of

log = logging.getLogger(__name__)

_GSM8K = re.compile(r"####\s*(.+?)\s*$", re.S)
_ROW_KEYS = ("id", "question", "answer", "messages", "checker", "extract", "instruction")
_CODE_KEYS = ("id", "description", "entry_point", "tests", "solution")


def gold_from_text(answer: str) -> str:
    """Normalize a gold answer given in GSM8K (`... #### 42`) or MATH (`\\boxed{..}`) style."""
    answer = str(answer).strip()
    m = _GSM8K.search(answer)
    if m:
        return m.group(1).replace(",", "").strip()
    boxed = last_boxed(answer)
    return boxed if boxed is not None else answer


def _text(row: dict[str, Any], key: str, where: str, numbers: bool = False) -> str | None:
    """row[key] as text (None if absent or null). Another type would be silently stringified
    into a problem nobody wrote, so it is an error naming the field."""
    value = row.get(key)
    if value is None:
        return None
    allowed = (str, int, float) if numbers else (str,)
    if not isinstance(value, allowed) or isinstance(value, bool):
        kind = "a string or a number" if numbers else "a string"
        raise DriftError(f"{where}: field {key!r} must be {kind}, got {type(value).__name__}")
    return str(value)


def _messages(row: dict[str, Any], where: str) -> list[dict[str, str]] | None:
    messages = row.get("messages")
    if messages is None:
        return None
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise DriftError(f"{where}: field 'messages' must be a list of {{role, content}} objects with string values")
    return [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]


def _code_from_row(row: dict[str, Any], where: str, default_id: str) -> Problem:
    """A code task row: description, entry_point, tests (a list of Python statements), optional id and solution."""
    description, entry = _text(row, "description", where), _text(row, "entry_point", where)
    tests = row.get("tests")
    if not description or not entry or not entry.isidentifier():
        raise DriftError(f"{where}: a code task needs 'description' and 'entry_point' (a function name)")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        raise DriftError(f"{where}: field 'tests' must be a non-empty list of Python statements (strings)")
    return code_problem(entry, description, tests, _text(row, "solution", where) or "",
                        _text(row, "id", where, numbers=True) or default_id,
                        {k: v for k, v in row.items() if k not in _CODE_KEYS})


def _problem_from_row(row: dict[str, Any], where: str, default_id: str) -> Problem:
    if "entry_point" in row:
        return _code_from_row(row, where, default_id)
    answer = _text(row, "answer", where, numbers=True)
    if answer is None:
        raise DriftError(f"{where}: missing field 'answer'")
    key = next((k for k in ("question", "problem", "query") if row.get(k) is not None), "question")
    question = _text(row, key, where)
    messages = _messages(row, where)
    if not question and not messages:
        raise DriftError(f"{where}: needs 'question' or 'messages'")
    return Problem(
        id=_text(row, "id", where, numbers=True) or default_id,
        question=question or messages[-1]["content"],
        answer=gold_from_text(answer),
        checker=_text(row, "checker", where) or "math",
        extract=_text(row, "extract", where) or "auto",
        instruction=_text(row, "instruction", where),
        messages=messages,
        metadata={k: v for k, v in row.items() if k not in _ROW_KEYS},
    )


def _load_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as e:
        raise DriftError(f"{path}: not a readable Parquet file ({' '.join(str(e).split())})") from None


def _load_file(path: Path) -> list[Problem]:
    if path.suffix == ".parquet":
        rows = enumerate(_load_parquet(path), 1)
        problems = [_problem_from_row(r, f"{path}:row {i}", f"{path.stem}-{i - 1}") for i, r in rows]
    else:
        problems = [_problem_from_row(r, f"{path}:{ln}", f"{path.stem}-{ln}") for ln, r in read_jsonl(path)]
    if not problems:
        raise DriftError(f"{path}: no problems (empty file)")
    return problems


def _load_hf(spec: str) -> list[Problem]:
    """`hf:NAME[:CONFIG][@SPLIT]` — e.g. `hf:openai/gsm8k:main@test`."""
    try:
        import datasets
    except ImportError:
        raise DriftError(f"tasks {spec!r}: hf: tasks need the datasets package: pip install 'drift-rl[hub]'") from None

    body = spec[3:]
    body, _, split = body.partition("@")
    name, _, cfg = body.partition(":")
    try:
        ds = datasets.load_dataset(name, cfg or None, split=split or "test")
    except Exception as e:  # the hub raises many types; report them as one user-facing error
        raise DriftError(f"cannot load Hugging Face dataset {name!r}: {e}") from None
    return [_problem_from_row(dict(r), f"{spec}:row {i + 1}", f"{name.split('/')[-1]}-{i}") for i, r in enumerate(ds)]


def _load_source(name: str) -> list[Problem]:
    if name.startswith("hf:"):
        return _load_hf(name)
    if name.startswith("verifiers:"):
        # an optional dependency: imported only for a verifiers task source
        from drift.envs.verifiers_env import verifiers_problems

        return verifiers_problems(name.removeprefix("verifiers:"))
    path = Path(name)
    if not path.is_file():
        raise DriftError(f"tasks {name!r}: not a built-in generator ({', '.join([*GENERATORS, CODE_TASKS])}), "
                         "not an existing file, and not hf:NAME or verifiers:NAME")
    return _load_file(path)


def _take_split(problems: list[Problem], spec: TaskSpec) -> list[Problem]:
    """The problems of `spec.split` by a hash of their id (generators split by fact themselves)."""
    if spec.split == "all":
        return problems
    kept = [p for p in problems if split_of(p.id) == spec.split]
    if not kept:
        raise DriftError(f"tasks {spec.tasks!r}: none of its {len(problems)} problems falls in the {spec.split} split "
                         "(a fixed hash of each id): use --split all to take every problem")
    log.info("tasks %s: the %s split keeps %d of %d problems (a fixed hash of each id; --split all takes every one)",
             spec.tasks, spec.split, len(kept), len(problems))
    return kept


def load_tasks(spec: TaskSpec) -> list[Problem]:
    """Resolve a TaskSpec to a list of problems (deterministic)."""
    if spec.split not in SPLITS:
        raise DriftError(f"split must be train, test or all, got {spec.split!r}")
    name = spec.tasks
    if name in GENERATORS:
        problems = generate(name, spec.num_problems, spec.task_seed, spec.split)
    elif name == CODE_TASKS:
        problems = generate_code(spec.num_problems, spec.task_seed, spec.split)
    else:
        problems = _load_source(name)
        seen: set[str] = set()
        for p in problems:
            if p.id in seen:
                raise DriftError(f"tasks {name!r}: duplicate problem id {p.id!r}")
            seen.add(p.id)
        problems = _take_split(problems, spec)[: spec.num_problems]
    if spec.checker:
        for p in problems:
            p.checker = spec.checker
    return problems
