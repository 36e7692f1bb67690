"""Ensemble selection over trials: greedy forward selection with replacement (Caruana et al.,
2004, "Ensemble selection from libraries of models"; AutoGluon's weighted ensemble) on
out-of-fold probabilities, and a nested estimate of what the selection is worth. Pure.

A member is one trial's k fold models; its OOF vector holds, for every labelled patch, the
probability from the fold model that did not train on it. All members share the folds, so
averaging their OOF vectors is exactly the OOF of the averaged ensemble.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score

from search.training.metrics import blend

MAX_STEPS = 25  # AutoGluon's default ensemble_size: 25 greedy additions


@dataclass(frozen=True)
class Selection:
    """What greedy selection chose."""

    counts: list[int]  # per member: how many times it was added
    curve: list[float]  # OOF AUC of the running average after each step (1, 2, ...)
    auc: float  # OOF AUC of the chosen weights (the best step of the curve)

    @property
    def weights(self) -> list[float]:
        n = sum(self.counts)
        return [c / n for c in self.counts]


def greedy_select(oof: np.ndarray, y: np.ndarray, max_steps: int = MAX_STEPS) -> Selection:
    """Greedy forward selection with replacement. ``oof``: (M, N) member probabilities,
    ``y``: (N,) 0/1 labels. Each step adds the member whose addition gives the best AUC of the
    running average (ties: the lower index, i.e. the better-ranked trial); the result keeps the
    counts of the best step (earliest on ties), so more steps never lower the OOF AUC."""
    oof = np.asarray(oof, np.float64)
    if oof.ndim != 2 or oof.shape[1] != len(y):
        raise ValueError(f"oof must be (members, {len(y)}), got {oof.shape}")
    counts = np.zeros(len(oof), np.int64)
    total = np.zeros(oof.shape[1])
    curve: list[float] = []
    best_counts, best_auc = counts.copy(), -np.inf
    for step in range(1, max_steps + 1):
        scores = [roc_auc_score(y, (total + m) / step) for m in oof]
        pick = int(np.argmax(scores))  # first maximum: the better-ranked member on ties
        counts[pick] += 1
        total += oof[pick]
        curve.append(float(scores[pick]))
        if scores[pick] > best_auc:
            best_counts, best_auc = counts.copy(), float(scores[pick])
    return Selection([int(c) for c in best_counts], curve, best_auc)


@dataclass(frozen=True)
class Nested:
    """Selection made without one fold, scored on that fold, for every fold."""

    auc: float  # mean of the left-out folds' AUCs: the estimate of a test AUC
    pooled_auc: float  # AUC of the pooled left-out predictions (vs the selection's OOF AUC)
    fold_aucs: list[float]  # each left-out fold's AUC


def nested_estimate(
    oof: np.ndarray, y: np.ndarray, folds: np.ndarray, max_steps: int = MAX_STEPS
) -> Nested:
    """Selection on OOF is optimistic: it picked the weights on the same predictions it is
    scored on. For each fold f, select on the other folds' rows, predict fold f's rows with
    those weights and score them. The estimate is the mean of those fold AUCs: each is one
    predictor's AUC on slides it was not chosen (or trained) on, which is what a test AUC is.
    The pooled AUC ranks rows of k differently chosen blends on one scale, which a single
    predictor never does (it is lower when their calibrations differ); it is the one to set
    beside the selection's own pooled OOF AUC, to see the optimism."""
    oof, y, folds = np.asarray(oof), np.asarray(y), np.asarray(folds)
    pred = np.empty(len(y))
    fold_aucs = []
    for f in np.unique(folds):
        held = folds == f
        sel = greedy_select(oof[:, ~held], y[~held], max_steps)
        pred[held] = blend(oof[:, held], sel.weights)
        fold_aucs.append(float(roc_auc_score(y[held], pred[held])))
    return Nested(float(np.mean(fold_aucs)), float(roc_auc_score(y, pred)), fold_aucs)
