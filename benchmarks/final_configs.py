"""Is the final model better as one configuration, or as an average of different ones?

    python benchmarks/final_configs.py [--settings hard stain] [--epochs 48] [--configs ...]

``--budget``'s final model is the search's best params trained on every labelled row for up
to 48 epochs (CPU). On the harder generator settings a second seed of the same params or more
epochs buy nothing there (docs/benchmarks.md, "The final model"). This asks the two
questions left:

  1. does any nearby configuration of the CPU space beat the hand-tuned recipe at 48
     full-data epochs (what a search would have to find to beat (d) by more than noise)?
  2. does the average of two *different* configurations' models beat the best one alone, and
     a second seed of it (equal compute)?

Each variant is the recipe (anytime.FIXED) with a few params changed, trained once on every
labelled row; test AUC of its 8-view TTA prediction on the held-out test slides, then of the
mean probability of every pair and of all of them. Wall seconds of each training in brackets.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anytime import FIXED, SETTINGS, TTA, _load, dataset  # noqa: E402

from search.common.ensemble import Ensemble  # noqa: E402
from search.training.engine import TrainParams, train_full  # noqa: E402

# name -> (params changed from the recipe, seed). "seed1" is the same-config control.
VARIANTS = {
    "recipe": ({}, 0),
    "seed1": ({}, 1),
    "reg": ({"dropout": 0.4, "weight_decay": 1e-3}, 0),
    "w24": ({"width": 24}, 0),
    "c64": ({"crop": 64}, 0),
    "cosine": ({"optimizer": "adam", "schedule": "cosine", "batch_size": 64, "lr": 2e-3}, 0),
}


def predict(params: dict, seed: int, epochs: int, cache, data) -> tuple[np.ndarray, float]:
    """8-view TTA probabilities of one full-data model on the test slides, and its train s."""
    p = TrainParams.from_dict({**FIXED, **params})
    t = time.perf_counter()
    states = train_full(p, data, epochs=epochs, seeds=[seed], threads=2)
    s = time.perf_counter() - t
    rows = cache.rows("test")
    return Ensemble.from_states(states, p).predict(cache.images[rows], tta=TTA), s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", nargs="+", default=["hard", "stain"], choices=list(SETTINGS))
    ap.add_argument("--epochs", type=int, default=48)
    ap.add_argument("--configs", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    torch.set_num_threads(2)
    for name in args.settings:
        cache, data, _ = _load(dataset(name))
        y = cache.index["label"].to_numpy()[cache.rows("test")]
        probs, secs = {}, {}
        for v in args.configs:
            probs[v], secs[v] = predict(*VARIANTS[v], args.epochs, cache, data)
            print(f"{name} {v}: {roc_auc_score(y, probs[v]):.4f} ({secs[v]:.0f} s)", flush=True)
        print(f"\n{name}, {args.epochs} full-data epochs each: single models")
        print("| variant | changed | test AUC | s |\n|---|---|---:|---:|")
        for v in args.configs:
            ch, seed = VARIANTS[v]
            desc = ", ".join(f"{k}={x}" for k, x in ch.items()) or f"(recipe, seed {seed})"
            print(f"| {v} | {desc} | {roc_auc_score(y, probs[v]):.4f} | {secs[v]:.0f} |")
        print(f"\n{name}: mean probability of two models (vs the better one alone)")
        print("| pair | test AUC | vs better single |\n|---|---:|---:|")
        for a, b in itertools.combinations(args.configs, 2):
            auc = roc_auc_score(y, (probs[a] + probs[b]) / 2)
            best = max(roc_auc_score(y, probs[a]), roc_auc_score(y, probs[b]))
            print(f"| {a} + {b} | {auc:.4f} | {auc - best:+.4f} |")
        every = np.mean([probs[v] for v in args.configs], axis=0)
        print(f"| all {len(args.configs)} | {roc_auc_score(y, every):.4f} | |\n", flush=True)


if __name__ == "__main__":
    main()
