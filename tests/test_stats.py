"""Intervals and exact tests against literal values (each checked once with scipy 1.17.1:
fisher_exact, binomtest(...).pvalue, binomtest(...).proportion_ci(method="wilson"))."""

from __future__ import annotations

import pytest

from drift import DriftError
from drift.stats import (StatsConfig, bootstrap_ci, enumeration_baseline, fisher_exact, mcnemar_exact,
                         paired_counts, rate_ci, run_stats, wilson)


def test_wilson_interval():
    assert wilson(8, 24) == pytest.approx((0.17972190327297755, 0.5329368316186825))
    assert wilson(15, 204) == pytest.approx((0.04506311633330258, 0.11776031173880948))
    # at the edges the interval stays inside [0, 1] and is not empty
    assert wilson(0, 10) == pytest.approx((0.0, 0.27753279986288926))
    assert wilson(10, 10) == pytest.approx((0.7224672001371109, 1.0))
    assert wilson(0, 0) is None
    with pytest.raises(ValueError):
        wilson(3, 2)


def test_fisher_exact_two_sided():
    # the README's headline: online RL corrected 8 of 24, the base 15 of 204
    assert fisher_exact(8, 16, 15, 189) == pytest.approx(0.0008081538006047842)
    assert fisher_exact(3, 32, 15, 189) == pytest.approx(0.7332953500973131)
    assert fisher_exact(1, 9, 5, 5) == pytest.approx(0.14086687306501544)
    # the most extreme table of its margins: 2 / C(10, 5)
    assert fisher_exact(0, 5, 5, 0) == pytest.approx(2 / 252)
    assert fisher_exact(0, 0, 0, 0) == 1.0


def test_mcnemar_exact():
    # 2 against 9 discordant pairs: 2 * (C(11,0) + C(11,1) + C(11,2)) / 2^11 = 2 * 67 / 2048
    assert mcnemar_exact(2, 9) == pytest.approx(134 / 2048)
    assert mcnemar_exact(9, 2) == pytest.approx(134 / 2048)
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(0, 0) == 1.0


def test_paired_counts_and_rate_ci():
    a, b = [1, 0, 0, 1, 0], [1, 1, 1, 0, 0]
    assert paired_counts(a, b) == (2, 1)  # b alone solved problems 2 and 3; a alone problem 4
    assert paired_counts([0.5], [1]) is None  # several samples per problem: no McNemar
    with pytest.raises(ValueError):
        paired_counts([1], [1, 0])
    assert rate_ci([1, 0, 0, 0]) == pytest.approx(wilson(1, 4))


def test_bootstrap_interval():
    assert bootstrap_ci([]) is None
    assert bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)  # no spread, no width
    lo, hi = bootstrap_ci([0.0, 0.5, 1.0, 1.0])
    assert lo == 0.25 and hi == 1.0  # resampled means lie on the grid of quarters and eighths
    assert bootstrap_ci([0.0, 0.5, 1.0, 1.0]) == (lo, hi)  # fixed seed: the same interval


def test_enumeration_baseline():
    assert [enumeration_baseline(k, 4) for k in range(1, 6)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    with pytest.raises(ValueError):
        enumeration_baseline(0, 4)


def test_drift_stats_lines():
    assert run_stats(StatsConfig("fisher", ["8/24", "15/204"])) == \
        "8/24 against 15/204: Fisher's exact test, two-sided p = 0.00081"
    assert run_stats(StatsConfig("mcnemar", ["2", "9"])) == \
        "discordant 2 against 9: exact McNemar test, two-sided p = 0.065"
    assert run_stats(StatsConfig("wilson", ["8/24"])) == "8/24 = 33.3%, 95% Wilson interval 18.0-53.3%"
    with pytest.raises(DriftError, match="takes 2"):
        run_stats(StatsConfig("fisher", ["8/24"]))
    with pytest.raises(DriftError, match="K/N"):
        run_stats(StatsConfig("wilson", ["8:24"]))
