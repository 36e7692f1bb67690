"""ROC AUC as every step scores it, and the blend of ensemble members: pure functions on
label and probability arrays."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC of probabilities ``p`` for 0/1 labels ``y`` (both (N,)); NaN when ``y`` holds
    one class only (a tiny fold, a one-class test split), where AUC is undefined."""
    y = np.asarray(y)
    return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")


def blend(probs: np.ndarray, weights: list[float]) -> np.ndarray:
    """(M, N) member probabilities -> (N,) weighted mean (an ensemble's prediction)."""
    return np.tensordot(np.asarray(weights, np.float64), np.asarray(probs, np.float64), axes=1)


def fold_aucs(y: np.ndarray, p: np.ndarray, folds: np.ndarray, k: int) -> list[float]:
    """The AUC of each fold's rows, folds 0..k-1 (``folds``: (N,) fold of each row)."""
    y, p, folds = np.asarray(y), np.asarray(p), np.asarray(folds)
    return [auc(y[folds == f], p[folds == f]) for f in range(k)]
