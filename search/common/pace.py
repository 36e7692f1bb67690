"""How fast a trial ran, and what the final model can train in the time left. Pure; shared by
the deadline (how much to reserve for the final model) and the refit (what to train in
``--time``), so neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass

# Refit seconds per fold-epoch over a search trial's, measured on 2 cores (benchmarks/anytime.py:
# 0.59 and 0.68 in two --budget runs): a refit trains alone with every core, a trial with
# cpus_per_trial beside other trials.
REFIT_FACTOR = 0.6
# The same for a full-data final model, per fold-epoch (one of its epochs is k/(k-1) of them):
# it has no held-out pass either. Measured at --budget 600 on 2 cores (48 epochs = 72
# fold-epochs after the chosen trial's pace): 0.40 embedded, 0.43 stain, 0.49 hard; the
# largest, so the submission is not late (at 0.40 the hard run overran by 21 s). Sizing it at
# 0.6 over-reserved 1.5x: the embedded search ended at its first trial, 180 s went unused.
# A width-24, batch-64 model ran at 0.62 and 0.68; rather than reserve that for
# every model, the final models' training ends by the budget (train_full(seconds=...)).
FULL_FIT_FACTOR = 0.50
MARGIN = 1.15  # estimates are scaled up by this: better a trial too few than a late submission
# The final model's epochs are sized at the measured factor with a smaller margin: it trains
# alone, so its pace varies little, and every unused second is a lost epoch
FINAL_MARGIN = 1.05
# Between the search's end and the refit's start: running trials stop and Ray shuts down
# (~10-15 s seen on 2 cores); the final model's reserve includes it
STOP_S = 15.0
PREDICT_COST = 0.35  # seconds to predict one image / seconds to train on one (no backward)
REFIT_FIXED_S = 10.0  # loading data, saving the ensemble, writing the submission
# --budget: COMPLETE trials within this mean AUC of the best are a tie (per-fold AUCs of one
# trial spread by ~0.02 on the embedded set); the fastest of them trains the final model: it
# fits the most epochs into the rest of the budget, and epochs are what pay there
TIE_AUC = 0.005


@dataclass
class Pace:
    """How fast one trial ran."""

    seconds_per_fold_epoch: float
    images_per_s: float


def predict_seconds(images: int, pace: Pace) -> float:
    """Estimated seconds to predict ``images`` (test patches x TTA views) at ``pace``."""
    return images / max(pace.images_per_s, 1e-9) * PREDICT_COST


def final_epochs(
    seconds_left: float,
    folds: float,
    pace: Pace,
    predict_s: float,
    cap: int,
    factor: float = REFIT_FACTOR,
) -> int:
    """Epochs of the final model that fit ``seconds_left``, after the test predictions and
    fixed costs, at most ``cap``. ``folds``: fold-epochs one of its epochs costs (k for k
    fold models; k/(k-1) for one model on every labelled row); ``factor``: its seconds per
    fold-epoch over ``pace``'s. No more than the search's own epochs means: reuse the best
    trial's fold models."""
    train_s = seconds_left - predict_s * MARGIN - REFIT_FIXED_S
    per_epoch = folds * pace.seconds_per_fold_epoch * factor * FINAL_MARGIN
    epochs = int(train_s // per_epoch) if per_epoch > 0 else 0
    return max(0, min(epochs, cap))


# A full-data final model: one epoch passes over every labelled row, k/(k-1) fold-epochs
def full_fold_epochs(k: int) -> float:
    """Fold-epochs one epoch of a model on every labelled row costs (k-fold CV)."""
    return k / (k - 1)


MAX_FULL_MODELS = 3  # full-data final models (seeds) at the most


def full_fit_plan(
    seconds_left: float,
    k: int,
    pace: Pace,
    predict_s: float,
    cap: int,
    seed_epochs: int,
    factor: float = FULL_FIT_FACTOR,
) -> tuple[int, int]:
    """(models, epochs each) of a full-data final model: the most seeds (up to
    ``MAX_FULL_MODELS``) of which each still trains ``seed_epochs`` in an equal share of the
    time, each at most ``cap`` epochs; below two such shares, one model takes all of it.
    Epochs pay first, then seeds: one model's test AUC stops rising at about
    ``seed_epochs`` (measured: docs/benchmarks.md, "The final model"), an average of seeds
    does not."""
    for n in range(MAX_FULL_MODELS, 1, -1):  # n models: n epochs and n predictions per step
        left = seconds_left - (n - 1) * predict_s * MARGIN
        epochs = final_epochs(left, n * full_fold_epochs(k), pace, predict_s, cap, factor)
        if epochs >= seed_epochs:
            return n, epochs
    return 1, final_epochs(seconds_left, full_fold_epochs(k), pace, predict_s, cap, factor)


def pick_final(trials: list[tuple[int, float, float]], tie: float = TIE_AUC) -> int:
    """The trial whose params train the final model: ``trials`` = (number, mean AUC, seconds
    per fold-epoch) of COMPLETE trials; the fastest of those within ``tie`` of the best."""
    best = max(v for _, v, _ in trials)
    close = [t for t in trials if t[1] >= best - tie]
    return min(close, key=lambda t: (t[2], -t[1]))[0]
