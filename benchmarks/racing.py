"""Fold racing vs lockstep: fold-epochs per trial and best mean AUC, same seed and trial count.

    python benchmarks/racing.py [--trials 30 --max-epochs 12] [-- extra pcam-search flags]

Runs ``pcam-search`` twice on the embedded data with the CPU default space, seed and folds:
once with fold racing (the default: a new trial trains fold 0 alone for 3 epochs, ASHA's
first rung at 3 fold-epochs) and once in lockstep (``--no-race --grace-period 3``: all k
folds from epoch 1, first rung at epoch 1). The later rungs (9, 27 fold-epochs) are the
same in both. Prints fold-epochs per trial, wall time, states and the best COMPLETE mean AUC.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import optuna


def run_search(tmp: Path, study: str, trials: int, max_epochs: int, extra: list[str]) -> dict:
    """One pcam-search in ``tmp`` (seed 0, embedded data); what its study holds after."""
    cmd = [
        str(Path(sys.executable).parent / "pcam-search"),
        "--trials",
        str(trials),
        "--max-epochs",
        str(max_epochs),
        "--study",
        study,
        "--studies-dir",
        str(tmp),
        "--no-progress",
        "--seed",
        "0",
        *extra,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    s = optuna.load_study(study_name=study, storage=f"sqlite:///{tmp / 'pcam.db'}")
    return {
        "wall": wall,
        "epochs": sum(t.user_attrs.get("epochs_run", 0) for t in s.trials),
        "fold_epochs": sum(t.user_attrs.get("fold_epochs", 0) for t in s.trials),
        "trials": len(s.trials),
        "best": s.best_value,
        "pruned": sum(t.state.name == "PRUNED" for t in s.trials),
        "complete": sum(t.state.name == "COMPLETE" for t in s.trials),
        # how far trials got: {epochs run: trials}, e.g. ASHA's rungs
        "reached": dict(
            sorted(Counter(t.user_attrs.get("epochs_run", 0) for t in s.trials).items())
        ),
    }


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
