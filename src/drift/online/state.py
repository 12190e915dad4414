"""The online run's resumable state, replaced atomically after each completed iteration.

    <online>/state/policy.pt      trainable weights + optimizer state (`Policy.state()`)
    <online>/state/progress.json  iterations done, the cost so far, the learning curve, per-iteration stats

A new state is written to state.tmp/ and swapped in by renames (state -> state.old, state.tmp ->
state, state.old removed), so a kill at any moment leaves one complete state: `load` takes
state/, or state.old/ when the kill fell between the two renames. Every random stream of an
iteration is seeded from (seed, iteration), so the state needs no generator states.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from drift.records import write_json

STATE, TMP, OLD = "state", "state.tmp", "state.old"


def save(directory: Path, policy_state: dict[str, Any], progress: dict[str, Any]) -> None:
    tmp, cur, old = directory / TMP, directory / STATE, directory / OLD
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(policy_state, tmp / "policy.pt")
    write_json(tmp / "progress.json", progress)
    for f in tmp.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    if cur.exists():
        shutil.rmtree(old, ignore_errors=True)
        cur.rename(old)
    tmp.rename(cur)
    shutil.rmtree(old, ignore_errors=True)


def load(directory: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(policy state, progress) of the last complete iteration, or None for a fresh run."""
    shutil.rmtree(directory / TMP, ignore_errors=True)
    for name in (STATE, OLD):
        d = directory / name
        if (d / "progress.json").is_file() and (d / "policy.pt").is_file():
            progress = json.loads((d / "progress.json").read_text())
            return torch.load(d / "policy.pt", map_location="cpu", weights_only=True), progress
    return None
