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
from drift.rundir import RolloutDir, check_schema, damaged, read_record

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
    reward: float | None = None  # the environment's reward where it is not the status's 0/1 (None: 1 if correct else 0)
    info: dict[str, Any] = field(default_factory=dict)  # what the environment recorded with the turn

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
        for t in d["turns"]:  # absent when unused: the rows of a 0/1 environment are those it always wrote
            if t["reward"] is None:
                del t["reward"]
            if not t["info"]:
                del t["info"]
        d["format_errors"] = self.format_errors
        d["timeouts"] = self.timeouts
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = "trajectory") -> Trajectory:
        check_row_schema(d, where)
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


def check_row_schema(row: dict[str, Any], where: str) -> None:
    """Refuse a row (trajectory or weighted) written by a newer drift."""
    check_schema(row.get("schema_version", SCHEMA_VERSION), where, SCHEMA_VERSION)


def return_inputs(row: dict[str, Any], where: str) -> ReturnInputs:
    """Read the return inputs from a drift row or a reference-format row."""
    if "turns" in row:
        check_row_schema(row, where)
        turns = row["turns"]
        if not isinstance(turns, list):
            raise DriftError(f"{where}: 'turns' must be a list")
        try:
            rewards = [float(t["reward"]) if t.get("reward") is not None else 1.0 if t["status"] == "correct" else 0.0
                       for t in turns]
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


def success_turn(row: dict[str, Any]) -> int | None:
    """The turn (from 1) at which this trajectory was solved, or None (either format)."""
    if "turns" in row:
        return row.get("success_turn")
    if row.get("t_star") is not None:
        return int(row["t_star"])
    solved = [int(k[1:]) for k, v in (row.get("turn_rewards") or {}).items() if float(v) > 0]
    return min(solved) if solved else None


def is_success(row: dict[str, Any]) -> bool:
    """Was this trajectory solved at some turn (either format)?"""
    return success_turn(row) is not None


class RowError(DriftError):
    """A problem with one data row; `reason` is the key under which skips are counted."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def check_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """A row's conversation: a non-empty list of {role, content} strings, else RowError."""
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RowError("no 'messages' list", "messages_invalid")
    for j, m in enumerate(msgs):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise RowError(f"message {j} is not an object with string 'role' and 'content'", "messages_invalid")
    return msgs


@dataclass
class WeightedRow:
    """One row of a weighted JSONL file (`drift weights` -> `drift train`): a trajectory's JSON
    with its return and weight added. On disk it is the trajectory's keys in their order, then
    `return` and `weight` (a row written by hand or another tool may lack `return`)."""

    fields: dict[str, Any]  # the row as read or sampled: prompt_id, sample_idx, messages, turns, ...
    weight: float
    ret: float | None = None
    pruned: bool = False  # `drift weights --prune`: not trained, still in the loss's normalizer

    def to_json(self) -> dict[str, Any]:
        out = dict(self.fields)
        if self.ret is not None:
            out["return"] = self.ret
        out["weight"] = self.weight
        if self.pruned:
            out["pruned"] = True
        return out

    @classmethod
    def from_json(cls, row: dict[str, Any], allow_negative: bool = False) -> WeightedRow:
        """A row read back; a missing, non-numeric, non-finite or (unless allowed) negative weight,
        or a malformed conversation, raises RowError."""
        if "weight" not in row:
            raise RowError("no 'weight' (weight the trajectories with `drift weights` first)", "weight_missing")
        w = row["weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise RowError(f"'weight' is not a number: {w!r}", "weight_invalid")
        if not math.isfinite(w):
            raise RowError(f"'weight' is not finite: {w!r}", "weight_invalid")
        if w < 0 and not allow_negative:
            raise RowError(f"negative weight {w}: the weighting method forbids it (allow_negative_weights "
                           "admits standardized weights such as swift's)", "weight_negative")
        check_messages(row)
        pruned = row.get("pruned", False)
        if not isinstance(pruned, bool):
            raise RowError(f"'pruned' is not true or false: {pruned!r}", "pruned_invalid")
        ret = row.get("return")
        return cls(row, float(w), ret if isinstance(ret, (int, float)) and not isinstance(ret, bool) else None, pruned)

    @property
    def messages(self) -> list[dict[str, str]]:
        return self.fields["messages"]

    @property
    def success_turn(self) -> int | None:
        return success_turn(self.fields)


def read_jsonl(path: str | Path, skip_bad: bool = False) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """Yield (line_number, row) of a JSONL file; a malformed line (bad JSON, not UTF-8) raises
    DriftError naming file and line, or with `skip_bad` yields (line_number, None) so the caller
    can count it."""
    p = Path(path)
    if not p.is_file():
        raise DriftError(f"file not found: {p}")
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                row = _parse_line(raw)
            except ValueError as e:
                if skip_bad:
                    yield lineno, None
                    continue
                raise DriftError(f"{p}:{lineno}: {e}") from None
            if row is not None:
                yield lineno, row


def _parse_line(raw: bytes) -> dict[str, Any] | None:
    """One JSONL line as a dict (None if blank); a ValueError says what is wrong with it."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except ValueError as e:
        raise ValueError(f"malformed JSON line ({e})") from None
    if not isinstance(row, dict):
        raise ValueError("malformed JSON line (not a JSON object)")
    return row


def jsonl_files(path: str | Path) -> list[Path]:
    """A JSONL file itself, or every *.jsonl in a directory (sorted: shard order)."""
    p = Path(path)
    return sorted(p.glob("*.jsonl")) if p.is_dir() else [p]


def trajectory_files(path: str | Path) -> tuple[list[Path], dict[str, Any] | None]:
    """The files a trajectory input names, and its rollout manifest (None if it has none).

    The one rule for every stage that reads trajectories:
    - a file: itself (and, for a shard inside a rollout's `trajectories/`, that rollout's manifest);
    - a rollout directory (it holds a manifest): its `trajectories/` shards, never other *.jsonl
      beside them (a weights output written into the run directory is not read back);
    - a `trajectories/` directory whose parent holds a manifest: its shards and that manifest;
    - any other directory: its *.jsonl files.
    """
    p = Path(path)
    if p.is_file():
        rollout = _rollout_of(p.parent)
        return [p], None if rollout is None or p.parent != rollout.shards else read_record(rollout.manifest)
    if not p.is_dir():
        raise DriftError(f"input not found: {p}")
    rollout = _rollout_of(p)
    if rollout is None:
        files, manifest = jsonl_files(p), None
    else:
        files, manifest = jsonl_files(rollout.shards) if rollout.shards.is_dir() else [], read_record(rollout.manifest)
    if not files:
        raise DriftError(f"{p}: no .jsonl files in this directory" if rollout is None else
                         f"{p}: a rollout directory without trajectories yet (nothing in {rollout.shards})")
    return files, manifest


def _rollout_of(directory: Path) -> RolloutDir | None:
    """The rollout directory `directory` is (or whose trajectories/ it is), if any."""
    for rollout in (RolloutDir(directory), RolloutDir(directory.parent)):
        if directory in (rollout.path, rollout.shards) and rollout.manifest.is_file():
            return rollout
    return None


def require_complete(path: str | Path, manifest: dict[str, Any] | None, hint: str = "") -> None:
    """Refuse the trajectories of a rollout whose manifest does not say it finished, or whose
    shards are not the ones it vouches for (`files`: truncated, edited, gone)."""
    if manifest is None:
        return
    if manifest.get("status") != "complete":
        raise DriftError(f"{path}: the rollout is not complete (manifest status {manifest.get('status')!r}): "
                         f"finish it with `drift rollout --resume` and the same settings first{hint}")
    p = Path(path)
    rollout = _rollout_of(p if p.is_dir() else p.parent)
    if rollout is not None and (harm := damaged(rollout.path, manifest)):
        raise DriftError(f"{path}: damaged rollout: {'; '.join(harm)}; `drift rollout --resume` with the same "
                         f"settings samples those conversations again{hint}")


def read_trajectories(path: str | Path) -> list[Trajectory]:
    """Drift-format trajectories from a file, shard directory or rollout directory (`trajectory_files`)."""
    out = []
    for f in trajectory_files(path)[0]:
        for lineno, row in read_jsonl(f):
            where = f"{f}:{lineno}"
            try:
                out.append(Trajectory.from_json(row, where))
            except (KeyError, TypeError, ValueError) as e:
                raise DriftError(f"{where}: not a drift trajectory record ({e})") from None
    if not out:
        raise DriftError(f"{path}: no trajectories (empty input)")
    return out


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows atomically (temp file + rename) so a crash never leaves half a file."""
    lines = [json_line(row) + "\n" for row in rows]
    _write_atomic(Path(path), lines)
    return len(lines)


def write_json(path: str | Path, obj: Any) -> None:
    """Write one JSON document atomically; non-finite floats are written as null."""
    _write_atomic(Path(path), [json.dumps(_finite(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n"])


def json_line(obj: Any) -> str:
    """One JSONL line: strict JSON, non-finite floats as null."""
    return json.dumps(_finite(obj), ensure_ascii=False, allow_nan=False)


def _write_atomic(p: Path, chunks: list[str]) -> None:
    """Write through `<name>.tmp` and rename; the temp file is removed if writing fails."""
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(chunks)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _finite(o: Any) -> Any:
    """A JSON-ready copy of `o`: dataclasses as dicts, paths as strings, NaN and infinities as None.

    (json calls `default` only for types it does not know, so floats must be converted before.)
    """
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return _finite(dataclasses.asdict(o))
    if isinstance(o, Path):
        return str(o)
    return o
