"""Planted first answers: one wrong answer per problem, turn 1 of every conversation about it.

Every model is asked to correct the *same* wrong answers, so the probe compares models on the
same conversations instead of on each one's own (few, different) failures. By default they are
the reference model's own wrong turn-1 answers: `plant_samples` turn-1 samples per held-out problem
at temperature 1 (a rollout of one turn into <eval>/plant-rollout/), and per problem the wrong
answer given most often (ties: the first sampled), as its first response. They are written to
<eval>/planted.jsonl, one row `{prompt_id, response, answer_norm, times, samples}` per problem; give
that file (or that eval directory) to `--planted` of every other model's eval. A problem without
any parsed wrong answer among the samples has nothing to plant: it is left out, and counted.

A training rollout takes planted answers the same way (`drift rollout --planted RUN`): each prompt
group is n continuations of the same wrong answer, so DRIFT's weights compare continuations of the
same mistake (`arms.X.planted`, docs/usage.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from drift import DriftError
from drift.metrics import group_by_problem
from drift.records import Trajectory, read_jsonl, read_trajectories
from drift.rundir import EvalDir, RolloutDir, read_record
from drift.tasks import Problem

log = logging.getLogger(__name__)


def choose_planted(trajs: Sequence[Trajectory]) -> list[dict[str, Any]]:
    """Per problem (first-seen order) the turn-1 wrong answer given most often, ties to the first sampled."""
    rows = []
    for pid, group in group_by_problem(trajs).items():
        wrong = [t.turns[0] for t in sorted(group, key=lambda t: t.sample_idx)
                 if t.turns and t.turns[0].status == "wrong" and t.turns[0].answer_norm]
        if not wrong:
            continue
        counts = Counter(t.answer_norm for t in wrong)
        best = max(counts.values())
        first = next(t for t in wrong if counts[t.answer_norm] == best)
        rows.append({"prompt_id": pid, "response": first.response, "answer_norm": first.answer_norm,
                     "times": best, "samples": len(group)})
    return rows


def read_planted(source: str | Path) -> dict[str, str]:
    """prompt_id -> planted response, from a planted.jsonl, an eval directory holding one, or
    trajectories (a file or rollout directory) whose wrong turn-1 answers are chosen (`choose_planted`)."""
    p = Path(source)
    if p.is_dir() and EvalDir(p).planted.is_file():
        p = EvalDir(p).planted
    if p.is_file():
        rows = [row for _, row in read_jsonl(p)]
        if rows and "turns" not in rows[0]:
            for i, row in enumerate(rows, 1):
                if not isinstance(row.get("prompt_id"), str) or not isinstance(row.get("response"), str):
                    raise DriftError(f"{p}:{i}: a planted row needs a prompt_id and a response (strings)")
            return {row["prompt_id"]: row["response"] for row in rows}
    return {row["prompt_id"]: row["response"] for row in choose_planted(read_trajectories(p))}


def planted_source(source: str | Path) -> dict[str, Any]:
    """The record of where planted answers come from, for the record of the stage that plants them:
    a rollout's own record (its manifest), else the digest of the planted file's bytes."""
    p = Path(source)
    if p.is_dir() and EvalDir(p).planted.is_file():
        p = EvalDir(p).planted
    if p.is_dir() and RolloutDir(p).manifest.is_file():
        rec = read_record(RolloutDir(p).manifest)
        if (rec or {}).get("status") != "complete":
            raise DriftError(f"planted answers from {p}: its rollout is not complete")
        return rec  # type: ignore[return-value]
    files = [p] if p.is_file() else sorted(p.glob("*.jsonl")) if p.is_dir() else []
    if not files:
        raise DriftError(f"planted answers: {p} is neither a planted.jsonl, an eval directory holding one, "
                         "nor trajectories")
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return {"digest": h.hexdigest()[:16]}


def plant(problems: Sequence[Problem], answers: dict[str, str]) -> tuple[list[Problem], int]:
    """The problems that have a planted answer, carrying it; and how many had none."""
    planted = [dataclasses.replace(p, planted=answers[p.id]) for p in problems if p.id in answers]
    missing = len(problems) - len(planted)
    if not planted:
        raise DriftError(f"no planted answer for any of the {len(problems)} problems: do the planted answers "
                         "come from the same tasks and split?")
    if missing:
        log.warning("%d of %d problems have no planted answer (the reference gave no wrong answer to them): "
                    "no conversation of theirs is planted", missing, len(problems))
    return planted, missing
