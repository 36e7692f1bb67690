"""``pcam-refit --best`` wall time, and the OOF vs test AUC gap: slide-grouped vs random folds.

    python benchmarks/refit_gap.py [--trials 40] [-- extra pcam-search flags]

For each fold strategy (slide-grouped, then random patch folds for contrast) in a fresh
studies folder: ``pcam-search`` with CPU defaults and ``--trials``, then ``pcam-refit --best``
(timed). The embedded dataset has true labels for its held-out test slides, so the refit
reports test AUC beside OOF AUC. Two gaps are printed: pooled OOF AUC - ensemble test AUC
(3 models x 8 TTA views on test vs one model on one view for OOF: not like for like), and
the like-for-like one, mean per-fold OOF AUC - mean test AUC of each fold model alone on
one view: how much the validation flattered the very models it scored.
Targets: refit <= 3 minutes; slide-grouped gap <= 0.02.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent


def _run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("extra", nargs="*", help="more pcam-search flags (after --)")
    args = ap.parse_args()
    rows = []
    for strategy in ("slide", "random"):
        with tempfile.TemporaryDirectory() as tmp:
            sd = ["--studies-dir", str(Path(tmp) / "studies")]
            search_s = _run(
                [
                    str(BIN / "pcam-search"),
                    "--trials",
                    str(args.trials),
                    "--fold-strategy",
                    strategy,
                    "--no-progress",
                    *sd,
                    *args.extra,
                ]
            )
            refit_s = _run([str(BIN / "pcam-refit"), "--best", "--no-progress", *sd])
            (rec,) = [
                json.loads(p.read_text()) for p in (Path(tmp) / "studies").rglob("refit.json")
            ]
            rows.append((strategy, search_s, refit_s, rec))
    print(
        f"embedded data, CPU defaults, {args.trials} search trials per strategy "
        f"{' '.join(args.extra)}"
    )
    print(
        f"{'folds':<8}{'search s':>9}{'refit s':>9}{'search AUC':>11}{'OOF AUC':>9}"
        f"{'ens test':>9}{'OOF-ens':>9}{'fold OOF':>9}{'1-model test':>13}{'gap':>8}"
    )
    for strategy, search_s, refit_s, r in rows:
        fold_oof, single = np.mean(r["oof_auc_folds"]), np.mean(r["test_auc_folds"])
        print(
            f"{strategy:<8}{search_s:>9.1f}{refit_s:>9.1f}{r['search_auc']:>11.4f}"
            f"{r['oof_auc']:>9.4f}{r['test_auc']:>9.4f}{r['oof_auc'] - r['test_auc']:>+9.4f}"
            f"{fold_oof:>9.4f}{single:>13.4f}{r['validation_minus_test']:>+8.4f}"
        )
    print(
        "gap = mean per-fold OOF AUC - mean single-model 1-view test AUC (like for like); "
        "targets: refit <= 180 s; slide-grouped |gap| <= 0.02"
    )


if __name__ == "__main__":
    main()
