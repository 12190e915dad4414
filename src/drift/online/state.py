"""The online run's resumable state, replaced atomically after each completed iteration.

    <online>/state/policy.pt      trainable weights + optimizer and learning-rate schedule state (`Policy.state()`)
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
from typing import Any

import torch

from drift.records import write_json
from drift.rundir import OnlineDir

def save(out: OnlineDir, policy_state: dict[str, Any], progress: dict[str, Any]) -> None:
    tmp, cur, old = out.state_tmp, out.state, out.state_old
    shutil.rmtree(tmp.path, ignore_errors=True)
    tmp.path.mkdir(parents=True)
    torch.save(policy_state, tmp.policy)
    write_json(tmp.progress, progress)
    for f in tmp.path.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    if cur.path.exists():
        shutil.rmtree(old.path, ignore_errors=True)
        cur.path.rename(old.path)
    tmp.path.rename(cur.path)
    shutil.rmtree(old.path, ignore_errors=True)


def load(out: OnlineDir) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(policy state, progress) of the last complete iteration, or None for a fresh run."""
    shutil.rmtree(out.state_tmp.path, ignore_errors=True)
    for d in (out.state, out.state_old):
        if d.progress.is_file() and d.policy.is_file():
            progress = json.loads(d.progress.read_text())
            return torch.load(d.policy, map_location="cpu", weights_only=True), progress
    return None
