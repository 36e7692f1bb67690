import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from search.submission.selection import greedy_select, nested_estimate
from search.training.metrics import blend


def _members(seed: int = 0, n: int = 600):
    """Labels and three members: two with independent noise (averaging helps), one random."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    a = y + rng.normal(0, 1.0, n)
    b = y + rng.normal(0, 1.0, n)
    noise = rng.normal(0, 1.0, n)
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    return y, np.stack([sig(a), sig(b), sig(noise)])


def test_greedy_select_averages_complementary_members_and_ignores_noise():
    y, oof = _members()
    sel = greedy_select(oof, y)
    alone = [roc_auc_score(y, m) for m in oof]
    assert sel.auc > max(alone) + 0.02
    assert sel.counts[2] == 0 and sel.counts[0] > 0 and sel.counts[1] > 0
    assert sum(sel.weights) == pytest.approx(1.0)
    assert roc_auc_score(y, blend(oof, sel.weights)) == pytest.approx(sel.auc)


def test_greedy_select_keeps_the_best_step_of_its_curve():
    y, oof = _members(1)
    sel = greedy_select(oof, y, max_steps=10)
    assert len(sel.curve) == 10 and sel.auc == max(sel.curve)
    assert sum(sel.counts) == sel.curve.index(max(sel.curve)) + 1
    # step 1 is the best single member
    assert sel.curve[0] == pytest.approx(max(roc_auc_score(y, m) for m in oof))


def test_greedy_select_with_replacement_can_weight_one_member_twice():
    y, oof = _members(2)
    strong = np.clip(oof[0] * 0.5 + y * 0.3, 0, 1)  # better than the rest
    sel = greedy_select(np.stack([strong, oof[1], oof[2]]), y, max_steps=25)
    assert max(sel.counts) >= 2


def test_greedy_select_refuses_misshapen_input():
    y, oof = _members()
    with pytest.raises(ValueError, match="members"):
        greedy_select(oof[:, :-1], y)


def test_nested_estimate_scores_each_fold_with_a_selection_made_without_it():
    y, oof = _members(3)
    folds = np.arange(len(y)) % 3
    sel = greedy_select(oof, y)
    nested = nested_estimate(oof, y, folds)
    assert len(nested.fold_aucs) == 3
    # not chosen on the rows it is scored on: no better than the in-sample selection here,
    # and far above the noise member
    assert nested.auc <= sel.auc + 1e-9
    assert nested.auc > roc_auc_score(y, oof[2]) + 0.1


def test_nested_estimate_is_the_mean_fold_auc_not_one_pooled_across_calibrations():
    # each fold ranked perfectly by its own blend, but on a different scale (fold f's scores
    # shifted by f): each fold's AUC, what a test set scored by one predictor would give, is
    # 1; pooling the folds' rows on one scale mixes the scales and reads lower
    y = np.tile([0, 1], 30)
    folds = np.repeat([0, 1, 2], 20)
    member = (0.2 + 0.5 * y + folds).astype(float)[None, :]  # (1, N)
    nested = nested_estimate(member, y, folds)
    assert nested.fold_aucs == [1.0, 1.0, 1.0]
    assert nested.auc == pytest.approx(1.0)
    assert nested.pooled_auc < 0.9
