import numpy as np
import pytest

from data_pipeline.folds import (
    fold_groups,
    fold_label,
    make_folds,
    slide_coverage,
    slide_map_warning,
)


def _data(n: int = 200, slides: int = 20, seed: int = 0):
    rng = np.random.default_rng(seed)
    groups = np.array([f"s{i % slides}" for i in range(n)], dtype=object)
    labels = (rng.random(n) < 0.4).astype(int)
    hashes = np.array([f"h{i}" for i in range(n)], dtype=object)
    return labels, groups, hashes


def test_make_folds_disjoint_and_cover_everything():
    labels, groups, hashes = _data()
    folds = make_folds(labels, groups, hashes, k=5, seed=0)
    # every row gets exactly one fold in 0..k-1, and every fold is used
    assert folds.shape == (200,)
    assert set(np.unique(folds)) == set(range(5))


def test_make_folds_no_slide_in_two_folds():
    labels, groups, hashes = _data()
    folds = make_folds(labels, groups, hashes, k=5, seed=0)
    for g in np.unique(groups):
        assert len(set(folds[groups == g])) == 1, g


def test_make_folds_class_balance_within_a_few_points():
    labels, groups, hashes = _data(n=2000, slides=200)
    folds = make_folds(labels, groups, hashes, k=5, seed=1)
    overall = labels.mean()
    for f in range(5):
        assert abs(labels[folds == f].mean() - overall) < 0.04


def test_make_folds_duplicates_forced_into_one_fold():
    labels, groups, hashes = _data()
    # rows 0 and 1 are on different slides but hold the same pixels; so do 5 (no slide) and 7
    hashes[1] = hashes[0]
    groups[5] = ""
    hashes[5] = hashes[7]
    for seed in range(5):
        folds = make_folds(labels, groups, hashes, k=5, seed=seed)
        assert folds[0] == folds[1]
        assert folds[5] == folds[7]
        # the merge joins the whole slides: every row of slide s0 and s1 share the fold
        assert len(set(folds[(groups == "s0") | (groups == "s1")])) == 1


def test_fold_groups_ids_without_slide_are_own_groups():
    groups = ["a", "a", "", None, float("nan"), "b"]
    g = fold_groups(groups, ["1", "2", "3", "4", "5", "6"])
    assert g[0] == g[1]
    assert len({g[2], g[3], g[4], g[5], g[0]}) == 5


def test_make_folds_deterministic_for_seed():
    labels, groups, hashes = _data()
    a = make_folds(labels, groups, hashes, k=5, seed=7)
    b = make_folds(labels, groups, hashes, k=5, seed=7)
    c = make_folds(labels, groups, hashes, k=5, seed=8)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_make_folds_random_strategy_ignores_slides():
    labels, groups, hashes = _data(n=400, slides=10)
    folds = make_folds(labels, groups, hashes, k=5, seed=0, strategy="random")
    # patch-level: every slide is spread over several folds (that is the leak it shows)
    assert all(len(set(folds[groups == g])) > 1 for g in np.unique(groups))


def test_make_folds_too_few_groups_is_clear_error():
    labels = np.array([0, 1] * 10)
    groups = np.array(["a", "b"] * 10, dtype=object)
    with pytest.raises(ValueError, match="slide groups"):
        make_folds(labels, groups, None, k=5, seed=0)


def test_make_folds_rejects_non_binary_labels():
    with pytest.raises(ValueError, match="0/1"):
        make_folds([0, 1, 2] * 10, None, None, k=2, seed=0)


@pytest.mark.parametrize(
    "slides, label",
    [
        (["a", "b", "c", "d"], "slide"),
        (["a", "b", "", None], "slide"),  # half covered: still mostly slide groups
        (["a", "", "", None], "slide-partial-map"),
        (["", "", None, ""], "patch-no-slide-map"),
    ],
)
def test_fold_label_names_what_the_folds_really_are(slides, label):
    cov = slide_coverage(slides)
    assert fold_label("slide", cov) == label
    assert fold_label("random", cov) == "random"
    assert (slide_map_warning(cov) is None) == (label == "slide")
