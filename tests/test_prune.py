"""Exact pruning of negligible weights (`drift.weights.prune_group`): which rows go, and the bound
on what the loss loses, on hand-made groups."""

import json
import math

import pytest

from drift import DriftError
from drift.weights import WeightsConfig, compute, drift_weights, prune_group


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


# --- the weights stage marks them, the trainer keeps them in the normalizer ------------------

def drift_row(pid, idx, statuses):
    turns = [{"response": "x", "answer": str(idx), "answer_norm": str(idx), "status": s, "tokens": 3,
              "finish_reason": "stop"} for s in statuses]
    return {"prompt_id": pid, "sample_idx": idx, "messages": [{"role": "user", "content": "q"}], "turns": turns,
            "success": "correct" in statuses}


def test_weights_stage_marks_pruned_rows_and_records_the_mass(tmp_path):
    # group a: one success at turn 1 among four: the failures get 4 e^-10 / (1 + 3 e^-10) = 1.8e-4 each,
    # 5.4e-4 together <= 1e-3 x 4: pruned. group b: all fail, equal returns: weight 1 each, nothing pruned.
    rows = [drift_row("a", 0, ["correct"])] + [drift_row("a", i, ["wrong"] * 3) for i in range(1, 4)]
    rows += [drift_row("b", i, ["wrong"]) for i in range(4)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, diag = compute(WeightsConfig(input=str(inp), output="o", beta=0.1, gamma=0.9, repeat_penalty=0.0, prune=1e-3))
    assert [r.pruned for r in out] == [False, True, True, True] + [False] * 4
    assert [r.to_json().get("pruned", False) for r in out] == [False, True, True, True] + [False] * 4
    failure = 4 * math.exp(-10) / (1 + 3 * math.exp(-10))
    assert diag["pruned_rows"] == 3 and diag["pruned_weight"] == pytest.approx(3 * failure, rel=1e-9)
    assert diag["pruned_weight_share"] == pytest.approx(3 * failure / 8, rel=1e-9)  # of the total weight, 8
    out, diag = compute(WeightsConfig(input=str(inp), output="o", repeat_penalty=0.0))  # the default: off
    assert not any("pruned" in r.to_json() for r in out) and diag["pruned_rows"] == 0
    out, _ = compute(WeightsConfig(input=str(inp), output="o", method="rft", prune=1e-3))
    assert not any(r.pruned for r in out)  # rft's zeros are min_weight's, as before


def test_prune_must_be_a_share():
    from drift.config import build

    with pytest.raises(DriftError, match="prune must be in"):
        build(WeightsConfig, {"prune": 1.0})


def test_a_pruned_flag_that_is_not_a_bool_is_a_clear_error(tmp_path, tiny_tokenizer):
    from drift.train.data import load_examples

    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "weight": 1.0,
           "pruned": "yes"}
    path = tmp_path / "w.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DriftError, match=r"w.jsonl:1: 'pruned' is not true or false: 'yes'"):
        load_examples(path, tiny_tokenizer)
