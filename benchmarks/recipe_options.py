"""Training-recipe options vs the default recipe, same epoch budget, held-out AUC over 3 seeds.

    python benchmarks/recipe_options.py [--epochs 4 --seeds 0 1 2]

Embedded dataset (n=4000), 3 slide-grouped folds, simple_cnn width 8, crop 32, AdamW lr 3e-3,
batch 64, augmentation 0.5. Each row changes one option; the figure is the mean held-out AUC
of the 3 fold models after the last epoch (with restore_best: at each fold's best epoch, which
is optimistic - the epoch is chosen on the same fold), averaged over seeds, and its difference
to the default row.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from data_pipeline import DataConfig, folds_for_cache, open_dataset
from search.engine import TrainData, train_cv

BASE = {
    "arch": "simple_cnn",
    "width": 8,
    "crop": 32,
    "optimizer": "adamw",
    "lr": 3e-3,
    "batch_size": 64,
    "aug": 0.5,
}
OPTIONS = {
    "default (BCE, no mixing)": {},
    "early stopping (patience 1, restore best)": {"patience": 1, "restore_best": True},
    "MixUp (alpha 0.4, p 0.5)": {"mix": "mixup", "mix_alpha": 0.4, "mix_prob": 0.5},
    "CutMix, centre rule (alpha 1, p 0.5)": {"mix": "cutmix", "mix_alpha": 1.0, "mix_prob": 0.5},
    "focal loss (gamma 2)": {"loss": "focal", "focal_gamma": 2.0},
    "positive weight 1.5": {"pos_weight": 1.5},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    cache = open_dataset(DataConfig(), progress=False)
    folds_df = folds_for_cache(cache, 3, 0, "slide")
    data = TrainData.from_cache(cache, folds_df["row"].to_numpy())
    folds = folds_df["fold"].to_numpy()
    rows = []
    for name, opt in OPTIONS.items():
        aucs, t0 = [], time.perf_counter()
        for seed in args.seeds:
            r = train_cv({**BASE, **opt}, data, folds, epochs=args.epochs, seed=seed, threads=2)
            aucs.append(r.final["auc"])
        rows.append(
            (
                name,
                float(np.mean(aucs)),
                float(np.std(aucs)),
                (time.perf_counter() - t0) / len(args.seeds),
            )
        )
    base = rows[0][1]
    print(f"embedded n=4000, 3 slide folds, {args.epochs} epochs, seeds {args.seeds}")
    print(f"{'recipe':<44}{'mean AUC':>9}{'± sd':>8}{'vs default':>11}{'s/run':>7}")
    for name, m, sd, sec in rows:
        print(f"{name:<44}{m:>9.4f}{sd:>8.4f}{m - base:>+11.4f}{sec:>7.1f}")


if __name__ == "__main__":
    main()
