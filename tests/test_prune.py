"""Exact pruning of negligible weights (`drift.weights.prune_group`): which rows go, and the bound
on what the loss loses, on hand-made groups."""

import math

import pytest

from drift.weights import drift_weights, prune_group


def test_smallest_rows_up_to_eps_of_the_group_total():
    # total 10; eps 0.01 -> budget 0.1: 0.02 + 0.03 + 0.04 = 0.09 fits, adding 0.05 would be 0.14
    weights = [5.0, 0.04, 0.02, 4.86, 0.03, 0.05]
    assert prune_group(weights, 0.01) == [False, True, True, False, True, False]


def test_ties_go_in_input_order_and_zeros_always_fit():
    assert prune_group([1.0, 0.0, 0.5, 0.5, 0.0], 0.1) == [False, True, False, False, True]  # budget 0.2
    assert prune_group([0.0, 0.0], 1e-3) == [True, True]  # an all-zero group (a dropped one) goes whole
    assert prune_group([1.0, 1.0, 1.0], 0.0) == [False, False, False]


def test_drift_group_with_one_success_prunes_its_failures():
    # returns 1 (success at turn 1) and 0 (failures), beta 0.1: failures get 8 e^-10 / (1 + 7 e^-10) ~ 3.6e-4
    w = drift_weights([1.0] + [0.0] * 7, 0.1)
    assert w[1] == pytest.approx(8 * math.exp(-10) / (1 + 7 * math.exp(-10)))
    assert prune_group(w, 1e-3) == [False] + [True] * 7  # 7 x 3.6e-4 = 2.5e-3 <= 1e-3 x 8


def test_negative_weights_are_refused():
    with pytest.raises(ValueError):
        prune_group([1.0, -0.5], 1e-3)


@pytest.mark.parametrize("normalize", ["mean", "weight_sum"])
def test_pruned_loss_equals_the_full_loss_within_the_bound(normalize):
    """Two groups with hand-picked returns and per-row losses l_i. The full loss is
    sum_i w_i l_i / D with D = N rows (mean) or sum_i w_i (weight_sum); pruning keeps D and drops
    the pruned rows' terms, so 0 <= full - pruned <= eps * sum_i w_i * max_i l_i / D."""
    eps = 1e-3
    groups = [[1.0, 0.0, 0.0, 0.9, -0.1, 0.0, 0.81, 0.0],  # one success at turn 1, two later ones
              [0.0, -0.25, 0.0, -1.0, 0.0, 0.0, -0.1, 0.0]]  # unsolved: repeats and format errors
    losses = [[0.3, 2.5, 2.1, 0.7, 3.0, 1.9, 0.9, 2.2], [2.0, 2.4, 1.8, 2.6, 2.2, 2.1, 2.9, 2.3]]
    weights = [drift_weights(g, 0.1) for g in groups]
    pruned = [prune_group(w, eps) for w in weights]
    # group 1: w = 5.27, 2.39e-4 (x4, R = 0), 1.94, 8.8e-5 (R = -0.1), 0.79: the five failures sum to
    # 1.05e-3 <= 1e-3 x 8. group 2: w = 1.47 (x5), 0.12, 6.7e-5 (R = -1), 0.54: only R = -1 fits.
    assert pruned == [[False, True, True, False, True, True, False, True], [False] * 3 + [True] + [False] * 4]
    w_all = [w for ws in weights for w in ws]
    l_all = [x for ls in losses for x in ls]
    p_all = [p for ps in pruned for p in ps]
    denom = len(w_all) if normalize == "mean" else sum(w_all)
    full = sum(w * x for w, x in zip(w_all, l_all)) / denom
    kept = sum(w * x for w, x, p in zip(w_all, l_all, p_all) if not p) / denom
    bound = eps * sum(w_all) * max(l_all) / denom
    assert 0 <= full - kept <= bound
    assert full - kept > 0  # something was dropped: the test is not vacuous
