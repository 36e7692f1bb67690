"""Wall time of ``pcam-search --trials 200`` with defaults, as a newcomer runs it.

    python benchmarks/search_wall_time.py [--trials 200] [-- extra pcam-search flags]

Runs the real command in a fresh cache and studies folder (so the embedded dataset is
generated and cached inside the timing, as on a first run), then reads the study and prints
wall time against the target (10 minutes on a 2-core machine), trials by state, epochs
trained and the best mean fold AUC.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

from search.attrs import get_record

TARGET_S = 600.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("extra", nargs="*", help="more pcam-search flags (after --)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PCAM_CACHE_DIR": str(Path(tmp) / "cache")}
        cmd = [
            str(Path(sys.executable).parent / "pcam-search"),
            "--trials",
            str(args.trials),
            "--studies-dir",
            str(Path(tmp) / "studies"),
            "--no-progress",
            *args.extra,
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"pcam-search failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(
            study_name="pcam", storage=f"sqlite:///{Path(tmp) / 'studies' / 'pcam.db'}"
        )
        trials = study.trials
        states = {
            s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")
        }
        epochs = sum(t.user_attrs.get("epochs_run", 0) for t in trials)
        cfg = get_record(study, "config")
    print(
        f"pcam-search --trials {args.trials} {' '.join(args.extra)}  "
        f"({os.cpu_count()} CPUs, torch threads per trial {cfg['cpus_per_trial']})"
    )
    print(f"{'measure':<34}{'value':>12}{'target':>12}{'ratio':>8}")
    print(f"{'wall time (s)':<34}{wall:>12.1f}{TARGET_S:>12.0f}{wall / TARGET_S:>8.2f}")
    print(f"{'s per finished trial':<34}{wall / max(1, len(trials)):>12.2f}")
    for s, n in states.items():
        print(f"{'trials ' + s.lower():<34}{n:>12d}")
    print(f"{'epochs trained (max ' + str(cfg['max_epochs']) + ' per trial)':<34}{epochs:>12d}")
    print(f"{'best mean ' + str(cfg['folds']) + '-fold AUC':<34}{study.best_value:>12.4f}")


if __name__ == "__main__":
    main()
