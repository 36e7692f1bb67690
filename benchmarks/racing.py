"""Fold racing vs lockstep: fold-epochs per trial and best mean AUC, same seed and trial count.

    python benchmarks/racing.py [--trials 30 --max-epochs 12] [-- extra pcam-search flags]

Runs ``pcam-search`` twice on the embedded data with the CPU default space, seed and folds:
once with fold racing (the default: a new trial trains fold 0 alone for one epoch, ASHA's
first rung at 1 fold-epoch) and once in lockstep as before (``--no-race --grace-period 3``:
all k folds from epoch 1, first rung at epoch 1). The later rungs (9, 27 fold-epochs) are the
same in both. Prints fold-epochs per trial, wall time, states and the best COMPLETE mean AUC.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent))
from asha_vs_full import run_search  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--max-epochs", type=int, default=12)
    ap.add_argument("extra", nargs="*", help="more pcam-search flags (after --)")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        lock = run_search(
            Path(tmp),
            "lockstep",
            args.trials,
            args.max_epochs,
            ["--no-race", "--grace-period", "3", *args.extra],
        )
        race = run_search(Path(tmp), "racing", args.trials, args.max_epochs, args.extra)
    print(f"{args.trials} trials, up to {args.max_epochs} epochs x 3 folds, seed 0, embedded")
    print(
        f"{'run':<10}{'fold-ep':>9}{'per trial':>10}{'wall s':>8}{'complete':>9}{'pruned':>7}"
        f"{'best AUC':>10}"
    )
    for name, r in (("lockstep", lock), ("racing", race)):
        print(
            f"{name:<10}{r['fold_epochs']:>9d}{r['fold_epochs'] / r['trials']:>10.1f}"
            f"{r['wall']:>8.0f}{r['complete']:>9d}{r['pruned']:>7d}{r['best']:>10.4f}"
        )
    print(f"racing trials by epochs run: {race['reached']}")
    print(
        f"racing / lockstep: fold-epochs {race['fold_epochs'] / lock['fold_epochs']:.2f}, "
        f"wall {race['wall'] / lock['wall']:.2f}, best AUC {race['best'] - lock['best']:+.4f}"
    )


if __name__ == "__main__":
    main()
