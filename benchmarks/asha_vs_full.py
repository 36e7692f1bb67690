"""ASHA vs no pruning on the embedded data: epochs trained and best mean fold AUC, side by side.

    python benchmarks/asha_vs_full.py [--trials 24 --max-epochs 9] [-- extra pcam-search flags]

Runs ``pcam-search`` twice with the same seed, trial count, space and folds - once with ASHA
(grace 1, eta 3), once with ``--no-asha`` (every trial trains ``--max-epochs``) - each in its
own study, and compares total epochs trained, wall time and the best COMPLETE mean AUC.
Target: ASHA trains <= 35% of the epochs with a best AUC within 0.005 of the full run.
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
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--max-epochs", type=int, default=9)
    ap.add_argument("extra", nargs="*", help="more pcam-search flags (after --)")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        full = run_search(
            Path(tmp), "full", args.trials, args.max_epochs, ["--no-asha", *args.extra]
        )
        asha = run_search(Path(tmp), "asha", args.trials, args.max_epochs, args.extra)
    print(
        f"{args.trials} trials, up to {args.max_epochs} epochs, seed 0, embedded data "
        f"{' '.join(args.extra)}"
    )
    print(f"{'run':<12}{'epochs':>8}{'wall s':>9}{'complete':>10}{'pruned':>8}{'best AUC':>10}")
    for name, r in (("no pruning", full), ("ASHA", asha)):
        print(
            f"{name:<12}{r['epochs']:>8d}{r['wall']:>9.1f}{r['complete']:>10d}"
            f"{r['pruned']:>8d}{r['best']:>10.4f}"
        )
    print(f"ASHA trials by epochs run: {asha['reached']}")
    print(
        f"ASHA / no pruning: epochs {asha['epochs'] / full['epochs']:.2f} (target <= 0.35), "
        f"wall {asha['wall'] / full['wall']:.2f}, best AUC difference "
        f"{asha['best'] - full['best']:+.4f} (target >= -0.005)"
    )


if __name__ == "__main__":
    main()
