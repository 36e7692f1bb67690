"""Small cached datasets for engine tests, and made-up studies for report/browser tests."""

from __future__ import annotations

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from data_pipeline import build_cache, folds_for_cache, load_cache
from data_pipeline.synth import SynthConfig, write
from search.common.attrs import (
    AUC_FOLDS,
    COMMAND,
    DATASET_FINGERPRINT,
    EPOCHS_RUN,
    ERROR_MESSAGE,
    ERROR_TYPE,
    LOSS_CURVE,
    SECONDS,
)
from search.training.engine import TrainData


def _make_study(n_complete: int, n_pruned: int, n_fail: int = 0, seed: int = 0) -> optuna.Study:
    rng = np.random.default_rng(seed)
    # a seeded sampler, and categorical values enqueued in turn, so every run draws the same
    # study and the complete trials cover both choices (a contour needs two batch sizes)
    st = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed))
    st.set_user_attr(DATASET_FINGERPRINT, "abc123")
    st.set_user_attr(COMMAND, "pcam-search --trials 10")
    for i in range(n_complete + n_pruned + n_fail):
        st.enqueue_trial(
            {"batch_size": (64, 128)[i % 2], "arch": ("simple_cnn", "resnet18")[(i // 2) % 2]}
        )
        t = st.ask()
        lr = t.suggest_float("lr", 1e-4, 1e-2, log=True)
        t.suggest_categorical("batch_size", [64, 128])
        t.suggest_categorical("arch", ["simple_cnn", "resnet18"])
        epochs = 3 if i < n_complete else 1
        losses = {}
        for e in range(1, epochs + 1):
            t.report(0.8 + 0.02 * e + 0.01 * np.log10(lr) + 0.01 * rng.random(), e)
            losses[str(e)] = [0.6 - 0.1 * e, 0.62 - 0.08 * e]
        t.set_user_attr(LOSS_CURVE, losses)
        t.set_user_attr(SECONDS, 3.0 * epochs)
        t.set_user_attr(EPOCHS_RUN, epochs)
        if i < n_complete:
            folds = [0.86 + 0.02 * rng.standard_normal() for _ in range(3)]
            t.set_user_attr(AUC_FOLDS, folds)
            st.tell(t, float(np.mean(folds)))
        elif i < n_complete + n_pruned:
            st.tell(t, state=TrialState.PRUNED)
        else:
            t.set_user_attr(ERROR_TYPE, "TrialDiverged")
            t.set_user_attr(ERROR_MESSAGE, "training loss is nan (fold 0) at epoch 1")
            st.tell(t, state=TrialState.FAIL)
    return st


def _add_refit(st: optuna.Study, tmp_path) -> optuna.Study:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.3 * y + 0.7 * rng.random(200), 0, 1)
    path = tmp_path / "oof.csv"
    pd.DataFrame(
        {"id": [f"i{i}" for i in range(200)], "label": y, "fold": np.arange(200) % 3, "prob": p}
    ).to_csv(path, index=False)
    st.set_user_attr(
        "refit",
        {
            "trial": 0,
            "oof_auc": 0.8,
            "oof_auc_folds": [0.8, 0.79, 0.81],
            "test_auc": 0.78,
            "test_auc_folds": [0.77, 0.76, 0.78],
            "validation_minus_test": 0.03,
            "oof_csv": str(path),
        },
    )
    return st


@pytest.fixture
def made_up_study():
    """``made_up_study(n_complete, n_pruned, n_fail=0)`` -> an in-memory study with
    intermediate values and the user attrs pcam-search writes."""
    return _make_study


@pytest.fixture
def with_refit():
    """``with_refit(study, folder)`` adds a refit record with a made-up oof.csv."""
    return _add_refit


@pytest.fixture(scope="module")
def cv_data(tmp_path_factory):
    """``cv_data(n, k, seed, n_test)`` -> (TrainData, folds): a freshly generated, cached
    embedded dataset of ``n`` train patches with ``k`` slide folds."""

    def make(n: int, k: int, seed: int = 0, n_test: int = 20) -> tuple[TrainData, np.ndarray]:
        root = tmp_path_factory.mktemp("cv")
        src = write(root / "kaggle", SynthConfig(n=n, n_test=n_test, seed=seed), "kaggle")
        cache = load_cache(build_cache(src, root / "cache", workers=1, progress=False))
        folds = folds_for_cache(cache, k=k, seed=0)
        return TrainData.from_cache(cache, folds.row.to_numpy()), folds.fold.to_numpy()

    return make
