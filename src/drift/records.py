"""Records every stage reads and writes: defined once, versioned on disk.

A trajectory is one conversation sampled for one problem. All trajectories of one problem
form a *prompt group*; `(prompt_id, sample_idx)` identifies a trajectory.

On disk: JSONL, one trajectory per line, loadable by `datasets.load_dataset("json", ...)`.
The reference implementation's rollout rows (`prompt_id`, `messages`, `turn_rewards`
`{"t1": r1, ...}`, `answer_norms`, `format_penalty`, `verifier`, `t_star`) are read too,
so their data can be reweighted here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drift import DriftError

SCHEMA_VERSION = 1

STATUSES = ("correct", "wrong", "unparseable", "timeout")


@dataclass
class Turn:
    """One assistant turn and what the checker made of it."""

    response: str  # the assistant message exactly as generated
    answer: str | None  # extracted final answer (None if unparseable)
    answer_norm: str | None  # normalized answer used for uniqueness (lower-case, no spaces)
    status: str  # one of STATUSES
    tokens: int = 0  # generated tokens for this turn (0 if unknown)
    finish_reason: str = "stop"  # "stop" (end-of-turn) or "length" (hit max_new_tokens)

    @property
    def correct(self) -> bool:
        return self.status == "correct"


@dataclass
class Trajectory:
    """One multi-turn conversation of the try-again environment."""

    prompt_id: str
    sample_idx: int
    messages: list[dict[str, str]]  # full conversation incl. system/user/feedback turns
    turns: list[Turn]
    gold: str
    success_turn: int | None = None  # 1-based turn of the first correct answer; None if never
    metadata: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def format_errors(self) -> int:
        return sum(t.status == "unparseable" for t in self.turns)

    @property
    def timeouts(self) -> int:
        """Turns whose check ran out of time: the checker's trouble, not the answer's format."""
        return sum(t.status == "timeout" for t in self.turns)

    @property
    def key(self) -> tuple[str, int]:
        return (self.prompt_id, self.sample_idx)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["format_errors"] = self.format_errors
        d["timeouts"] = self.timeouts
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Trajectory:
        turns = [Turn(**t) for t in d["turns"]]
        return cls(
            prompt_id=str(d["prompt_id"]),
            sample_idx=int(d["sample_idx"]),
            messages=list(d["messages"]),
            turns=turns,
            gold=str(d["gold"]),
            success_turn=d.get("success_turn"),
            metadata=dict(d.get("metadata") or {}),
            schema_version=int(d.get("schema_version", SCHEMA_VERSION)),
        )


@dataclass
class ReturnInputs:
    """What the return needs from a trajectory, whichever format it came in."""

    turn_rewards: list[float]  # r_t for t = 1..turns taken
    answer_norms: list[str]  # normalized answers of the turns that had a parseable answer
    format_errors: int  # number of unparseable turns
    format_penalty_sum: float | None = None  # reference rows store the summed penalty itself
    timeouts: int = 0  # number of turns whose check timed out (drift format)


def return_inputs(row: dict[str, Any], where: str) -> ReturnInputs:
    """Read the return inputs from a drift row or a reference-format row."""
    if "turns" in row:
        turns = row["turns"]
        if not isinstance(turns, list):
            raise DriftError(f"{where}: 'turns' must be a list")
        try:
            rewards = [1.0 if t["status"] == "correct" else 0.0 for t in turns]
            norms = [t["answer_norm"] for t in turns if t.get("answer_norm")]
            errors = sum(t["status"] == "unparseable" for t in turns)
            timeouts = sum(t["status"] == "timeout" for t in turns)
        except (KeyError, TypeError) as e:
            raise DriftError(f"{where}: malformed turn record (missing {e})") from None
        return ReturnInputs(rewards, norms, errors, timeouts=timeouts)
    if "turn_rewards" in row:
        tr = row["turn_rewards"]
        if not isinstance(tr, dict):
            raise DriftError(f"{where}: 'turn_rewards' must be an object like {{\"t1\": 0, \"t2\": 1}}")
        items = []
        for k, v in tr.items():
            if not (isinstance(k, str) and k.startswith("t") and k[1:].isdigit()):
                raise DriftError(f"{where}: turn_rewards key {k!r} is not of the form t<N>")
            try:
                items.append((int(k[1:]), float(v)))
            except (TypeError, ValueError):
                raise DriftError(f"{where}: turn_rewards[{k!r}] is not a number: {v!r}") from None
        items.sort()
        rewards = [0.0] * (items[-1][0] if items else 0)
        for t, r in items:
            rewards[t - 1] = r
        norms = row.get("answer_norms") or []
        if not isinstance(norms, list):
            raise DriftError(f"{where}: 'answer_norms' must be a list")
        fp = row.get("format_penalty", 0.0)
        try:
            fp = float(fp or 0.0)
        except (TypeError, ValueError):
            raise DriftError(f"{where}: 'format_penalty' is not a number: {fp!r}") from None
        # The reference counts every parsed answer (empty ones included) as an answered turn.
        return ReturnInputs(rewards, [str(n) if n else "" for n in norms], 0, fp)
    raise DriftError(f"{where}: row has neither 'turns' (drift format) nor 'turn_rewards' (reference format)")


def is_success(row: dict[str, Any]) -> bool:
    """Was this trajectory solved at some turn (either format)?"""
    if "turns" in row:
        return row.get("success_turn") is not None
    return row.get("t_star") is not None or any(float(v) > 0 for v in (row.get("turn_rewards") or {}).values())


def read_jsonl(path: str | Path, skip_bad: bool = False) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """Yield (line_number, row) of a JSONL file; a malformed line raises DriftError naming file
    and line, or with `skip_bad` yields (line_number, None) so the caller can count it."""
    p = Path(path)
    if not p.is_file():
        raise DriftError(f"file not found: {p}")
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                if skip_bad:
                    yield lineno, None
                    continue
                raise DriftError(f"{p}:{lineno}: malformed JSON line ({e})") from None
            yield lineno, row


def jsonl_files(path: str | Path) -> list[Path]:
    """A JSONL file itself, or every *.jsonl in a directory (sorted: shard order)."""
    p = Path(path)
    return sorted(p.glob("*.jsonl")) if p.is_dir() else [p]


def read_trajectories(path: str | Path) -> list[Trajectory]:
    """Drift-format trajectories from a file or a directory of shards."""
    p = Path(path)
    out = []
    for f in jsonl_files(p):
        for lineno, row in read_jsonl(f):
            try:
                out.append(Trajectory.from_json(row))
            except (KeyError, TypeError, ValueError) as e:
                raise DriftError(f"{f}:{lineno}: not a drift trajectory record ({e})") from None
    if not out:
        raise DriftError(f"{p}: no trajectories (empty input)")
    return out


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows atomically (temp file + rename) so a crash never leaves half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
            n += 1
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(p)
    return n


def write_json(path: str | Path, obj: Any) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n")
    tmp.replace(p)


def _json_default(o: Any) -> Any:
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"not JSON serializable: {type(o)}")
