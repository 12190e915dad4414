"""Group-relative advantages of the online arm (the critic-free GRPO family). Pure functions.

For a prompt group with returns R_1..R_G:
    A_i = R_i - mean(R)                      (default)
    A_i = (R_i - mean(R)) / (std(R) + eps)   (std = True; population std, eps = 1e-6)
A group whose returns are all equal (zero spread) carries no signal: every A_i is 0. Such groups
are skipped (left out of the update, their KL term too) and counted. `keep_top` < 1 keeps only
that fraction of the batch's groups, those with the largest return spread (UFO's filter; its
default run keeps the top 25%); the spread is the population standard deviation of the returns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from drift.weights import spread, standardized

ZERO_SPREAD = 1e-12


def group_advantages(returns: Sequence[float], std: bool = False) -> list[float]:
    """Centred returns; with std, standardized as Swift's weights are (`drift.weights.standardized`)."""
    if std:
        return standardized(returns)
    mean = sum(returns) / len(returns)
    return [r - mean for r in returns]


@dataclass
class Selection:
    kept: list[str]  # prompt ids whose groups are trained, in the batch's order
    zero_spread: list[str]  # skipped: all returns equal
    filtered: list[str]  # dropped by keep_top


def select_groups(groups: dict[str, Sequence[float]], keep_top: float = 1.0) -> Selection:
    """Which groups train: never a zero-spread one; of the B groups, at most ceil(keep_top * B),
    those of largest spread (ties broken by batch order)."""
    zero = [pid for pid, rs in groups.items() if spread(rs) <= ZERO_SPREAD]
    live = [pid for pid in groups if pid not in zero]
    limit = math.ceil(keep_top * len(groups) - 1e-9)
    ranked = sorted(live, key=lambda pid: -spread(groups[pid]))  # stable: batch order among ties
    chosen = set(ranked[:limit])
    return Selection([pid for pid in live if pid in chosen], zero, [pid for pid in live if pid not in chosen])
