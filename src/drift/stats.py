"""Confidence intervals and exact tests for the rates drift reports, and `drift stats`.

Pure functions of counts (no scipy: each is a few lines of exact arithmetic, checked in the tests
against values scipy 1.16 gives):
- `wilson(k, n)`: the Wilson score interval of a binomial rate k / n (95% by default). It stays
  inside [0, 1] and is sensible at k = 0 or k = n, where the normal interval collapses.
- `bootstrap_ci(values)`: the percentile interval of the mean of per-problem values, resampling
  problems with replacement (a fixed seed, so the same values give the same interval). Used when a
  problem carries several samples, whose outcomes are not independent.
- `rate_ci(values)`: Wilson when every value is 0 or 1 (one sample per problem), else the bootstrap.
- `fisher_exact(a, b, c, d)`: two-sided p of Fisher's exact test on the 2x2 table [[a, b], [c, d]]
  (rows: groups; columns: success, failure): the probability, with the margins fixed, of every
  table at most as likely as the observed one. For two rates on *different* problems.
- `mcnemar_exact(b, c)`: two-sided exact McNemar p for paired binary outcomes with b and c
  discordant pairs (each direction): the binomial test of b against Binomial(b + c, 1/2). For two
  rates on the *same* problems (two arms, or turn 1 against turn 2 of one arm).
- `enumeration_baseline(k, options)`: succ@k of a policy that never repeats an option, k / options
  (capped at 1): a multiple-choice model reaching it needs to know nothing but not to repeat itself.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from drift import DriftError
from drift.config import option

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
BOOTSTRAP_REPS = 2000
REL_TOL = 1 + 1e-7  # tables this close to the observed probability count as "as likely" (rounding)


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval (low, high) of the rate k / n; None when n = 0."""
    if not 0 <= k <= n:
        raise ValueError(f"wilson needs 0 <= k <= n, got k={k} n={n}")
    if n == 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_ci(values: Sequence[float], reps: int = BOOTSTRAP_REPS, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float] | None:
    """The percentile bootstrap interval of the mean of `values` (one per problem); None when empty."""
    if not values:
        return None
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(reps))
    lo = means[int(math.floor((1 - level) / 2 * reps))]
    hi = means[min(reps - 1, int(math.ceil((1 + level) / 2 * reps)) - 1)]
    return lo, hi


def rate_ci(values: Sequence[float]) -> tuple[float, float] | None:
    """A 95% interval of the mean of per-problem values: Wilson for 0/1 values, else the bootstrap."""
    if all(v in (0, 1) for v in values):
        return wilson(int(sum(values)), len(values))
    return bootstrap_ci(values)


def _hypergeom(x: int, row1: int, col1: int, total: int) -> float:
    """P(top-left cell = x) with the margins fixed."""
    return math.comb(row1, x) * math.comb(total - row1, col1 - x) / math.comb(total, col1)


def fisher_exact(a: int, b: int, c: int, d: int) -> float:
    """Two-sided p of Fisher's exact test on [[a, b], [c, d]]."""
    if min(a, b, c, d) < 0:
        raise ValueError(f"fisher_exact needs non-negative counts, got {[a, b, c, d]}")
    row1, col1, total = a + b, a + c, a + b + c + d
    if total == 0:
        return 1.0
    observed = _hypergeom(a, row1, col1, total)
    lo, hi = max(0, col1 - (total - row1)), min(row1, col1)
    p = sum(q for x in range(lo, hi + 1) if (q := _hypergeom(x, row1, col1, total)) <= observed * REL_TOL)
    return min(1.0, p)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p with b and c discordant pairs."""
    if min(b, c) < 0:
        raise ValueError(f"mcnemar_exact needs non-negative counts, got b={b} c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_counts(a: Sequence[float], b: Sequence[float]) -> tuple[int, int] | None:
    """(problems only b solved, problems only a solved) of two 0/1 vectors over the same problems;
    None when some value is not 0 or 1 (several samples per problem: use the paired standard error)."""
    if len(a) != len(b):
        raise ValueError(f"paired_counts needs vectors of one length, got {len(a)} and {len(b)}")
    if not all(v in (0, 1) for v in (*a, *b)):
        return None
    return sum(x == 0 and y == 1 for x, y in zip(a, b)), sum(x == 1 and y == 0 for x, y in zip(a, b))


def enumeration_baseline(k: int, options: int) -> float:
    """succ@k of a policy that tries a different option at every turn: min(k, options) / options."""
    if k < 1 or options < 1:
        raise ValueError(f"enumeration_baseline needs k >= 1 and options >= 1, got k={k} options={options}")
    return min(k, options) / options


@dataclass
class StatsConfig:
    """`drift stats`: an exact test or an interval from counts written on the command line."""

    test: Literal["fisher", "mcnemar", "wilson"] = option(
        "fisher", "fisher: two rates on different problems, counts K1/N1 K2/N2; mcnemar: paired outcomes, "
        "the two discordant counts B C; wilson: one rate, K/N")
    counts: list[str] = option([], "the counts: fisher 8/24 15/204; mcnemar 9 2; wilson 8/24", result=False)


def _fraction(text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise DriftError(f"{text!r}: give a count as K/N, e.g. 8/24") from None
    if not 0 <= k <= n:
        raise DriftError(f"{text!r}: needs 0 <= K <= N")
    return k, n


def run_stats(cfg: StatsConfig) -> str:
    """The test's result as one line of text (what `drift stats` prints)."""
    want = {"fisher": 2, "mcnemar": 2, "wilson": 1}[cfg.test]
    if len(cfg.counts) != want:
        raise DriftError(f"stats {cfg.test} takes {want} count(s), got {len(cfg.counts)}: {' '.join(cfg.counts)}")
    if cfg.test == "wilson":
        k, n = _fraction(cfg.counts[0])
        lo, hi = wilson(k, n) or (math.nan, math.nan)
        return f"{k}/{n} = {100 * k / n:.1f}%, 95% Wilson interval {100 * lo:.1f}-{100 * hi:.1f}%"
    if cfg.test == "fisher":
        (k1, n1), (k2, n2) = (_fraction(c) for c in cfg.counts)
        p = fisher_exact(k1, n1 - k1, k2, n2 - k2)
        return f"{k1}/{n1} against {k2}/{n2}: Fisher's exact test, two-sided p = {p:.2g}"
    try:
        b, c = (int(x) for x in cfg.counts)
    except ValueError:
        raise DriftError(f"stats mcnemar takes two whole counts, got {' '.join(cfg.counts)}") from None
    return f"discordant {b} against {c}: exact McNemar test, two-sided p = {mcnemar_exact(b, c):.2g}"
