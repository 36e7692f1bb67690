"""What to train as the final model, at the same compute: k fold models or full-data models.

    python benchmarks/final_model.py [--settings embedded hard stain] [--epochs 12 24]

The budget's final model is the search's best params trained again. With k = 3, the k fold
models cost k x (k-1)/k = 2 passes over the labelled pool per epoch, and each sees 2/3 of it.
At the same cost, two models trained on the whole pool (two seeds) each see all of it. Side by
side on each generator setting (benchmarks/anytime.py's), the hand-tuned recipe, E epochs:

  (i)   k fold models (what (d) and the refit train): test AUC of their 8-view TTA ensemble;
  (ii)  2 full-data models, E epochs each (same passes as (i));
  (iii) 1 full-data model, 2E epochs (same passes);
  and, free from (ii), 1 full-data model x E (its first seed): half the compute.

``--no-folds`` skips (i), for the question "more epochs or more seeds" alone.

``--ema D``: instead, (iii) 1 full-data model x 2E without and with an EMA of its weights
(decay D, timm ModelEmaV3 with warm-up; ``TrainParams.ema``), side by side, same seed.

``--compare KEY=A KEY=B [--seeds 0 1]``: instead, (iii) 1 full-data model x 2E of the recipe
with param KEY = A and = B (JSON values, e.g. ``decay_norms=true decay_norms=false``), for
each seed, and the mean difference B - A.

Test AUC on the generator's held-out test slides; wall seconds of the training.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anytime import FIXED, SETTINGS, TTA, K, _load, dataset  # noqa: E402

from search.common.ensemble import Ensemble  # noqa: E402
from search.training.engine import TrainParams, train_cv, train_full  # noqa: E402


def test_auc(p: TrainParams, states: list[dict], cache) -> float:
    rows = cache.rows("test")
    probs = Ensemble.from_states(states, p).predict(cache.images[rows], tta=TTA)
    return float(roc_auc_score(cache.index["label"].to_numpy()[rows], probs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--epochs", type=int, nargs="+", default=[12, 24])
    ap.add_argument("--no-folds", action="store_true", help="skip (i), the k fold models")
    ap.add_argument("--ema", type=float, default=None, help="compare EMA decay D (see above)")
    ap.add_argument("--compare", nargs=2, metavar="KEY=VALUE", help="two recipes (see above)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="--compare: seeds")
    args = ap.parse_args()
    torch.set_num_threads(2)
    p = TrainParams.from_dict(FIXED)
    if args.ema is not None:
        return ema_table(p, args.settings, args.epochs, args.ema)
    if args.compare:
        return compare_table(args.compare, args.settings, args.epochs, args.seeds)
    print(
        "| setting | epochs E | (i) k fold models | (ii) 2 full-data x E | (iii) 1 full x 2E "
        "| 1 full x E |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.settings:
        cache, data, folds = _load(dataset(name))
        for e in args.epochs:
            cells = [(float("nan"), 0.0)]
            if not args.no_folds:
                t = time.perf_counter()
                r = train_cv(p, data, folds, epochs=e, keep_states=True, threads=2)
                cells[0] = (test_auc(p, r.states, cache), time.perf_counter() - t)
            one = None
            for n, ep in ((K - 1, e), (1, (K - 1) * e)):
                t = time.perf_counter()
                states = train_full(p, data, epochs=ep, seeds=list(range(n)), threads=2)
                cells.append((test_auc(p, states, cache), time.perf_counter() - t))
                one = one or (test_auc(p, states[:1], cache), cells[-1][1] / n)
            cells.append(one)
            row = " | ".join(f"{a:.4f} ({s:.0f} s)" for a, s in cells)
            print(f"| {name} | {e} | {row} |", flush=True)


def ema_table(p: TrainParams, settings: list[str], epochs: list[int], decay: float) -> None:
    """(iii) 1 full-data model x 2E, without and with an EMA of its weights."""
    print(f"| setting | epochs | 1 full-data model | same, EMA {decay} | EMA - plain |")
    print("|---|---:|---:|---:|---:|")
    q = TrainParams.from_dict({**FIXED, "ema": decay})
    for name in settings:
        cache, data, _ = _load(dataset(name))
        for e in epochs:
            cells = []
            for params in (p, q):
                t = time.perf_counter()
                states = train_full(params, data, epochs=(K - 1) * e, threads=2)
                cells.append((test_auc(params, states, cache), time.perf_counter() - t))
            row = " | ".join(f"{a:.4f} ({s:.0f} s)" for a, s in cells)
            print(f"| {name} | {(K - 1) * e} | {row} | {cells[1][0] - cells[0][0]:+.4f} |")


def compare_table(change: list[str], settings: list[str], epochs: list[int], seeds: list[int]):
    """(iii) 1 full-data model x 2E of the recipe with KEY=A and KEY=B, per seed."""
    variants = []
    for kv in change:
        key, _, value = kv.partition("=")
        variants.append(TrainParams.from_dict({**FIXED, key: json.loads(value)}))
    print(f"| setting | epochs | seed | {change[0]} | {change[1]} | B - A |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in settings:
        cache, data, _ = _load(dataset(name))
        for e in epochs:
            diffs = []
            for seed in seeds:
                cells = []
                for params in variants:
                    t = time.perf_counter()
                    states = train_full(params, data, epochs=(K - 1) * e, seeds=[seed], threads=2)
                    cells.append((test_auc(params, states, cache), time.perf_counter() - t))
                diffs.append(cells[1][0] - cells[0][0])
                row = " | ".join(f"{a:.4f} ({s:.0f} s)" for a, s in cells)
                line = f"| {name} | {(K - 1) * e} | {seed} | {row} | {diffs[-1]:+.4f} |"
                print(line, flush=True)
            print(f"| {name} | {(K - 1) * e} | mean | | | {sum(diffs) / len(diffs):+.4f} |")


if __name__ == "__main__":
    main()
