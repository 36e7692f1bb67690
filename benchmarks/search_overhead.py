"""Orchestration overhead per trial: pcam-search's machinery vs plain Optuna, side by side.

    python benchmarks/search_overhead.py [--trials 100 --epochs 3]

Both sides run the same trivial objective (no training: ``epochs`` intermediate values made
up from lr, see ``search.tuning.ray_adapter.noop_trainable``) against a fresh SQLite study of
the same kind (WAL, the storage ``pcam-search`` opens), with the same space
(``studies/cpu.toml``) and TPE sampler:

- baseline: ``study.optimize(objective, n_trials)`` in one process;
- ours: ``search.tuning.ray_adapter.run_trials`` - Ray Tune, the truthful OptunaSearch, ASHA,
  reused actors, data through the object store - at concurrency 1 and 2.

Ray's start-up (``ray.init``, once per search) is timed separately. Target: <= 0.1 s/trial.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna

from search.common import study as studies
from search.training.engine import TrainData
from search.tuning import ray_adapter
from search.tuning.deadline import Deadline
from search.tuning.progress import Tally
from search.tuning.space import load_space, suggest


def _optuna_baseline(url: str, space, trials: int, epochs: int) -> float:
    study = optuna.create_study(
        storage=studies.make_storage(url),
        study_name="plain",
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=0, constant_liar=True),
    )

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, space)
        base = 0.9 - 0.05 * abs(math.log10(params["lr"]) + 3)
        for epoch in range(1, epochs + 1):
            trial.report(base + 0.01 * epoch, epoch)
        return base + 0.01 * epochs

    t0 = time.perf_counter()
    study.optimize(objective, n_trials=trials)
    return time.perf_counter() - t0


def _ours(url: str, space, trials: int, epochs: int, concurrency: int, tmp: Path) -> float:
    storage = studies.make_storage(url)
    name = f"ray-c{concurrency}"
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
    data = TrainData(np.zeros((64, 96, 96, 3), np.uint8), np.zeros(64, np.int64))
    t0 = time.perf_counter()
    run = ray_adapter.SearchRun(
        study=study,
        storage=storage,
        space_fn=lambda t: suggest(t, space),
        sampler=optuna.samplers.TPESampler(seed=0, constant_liar=True),
        n_trials=trials,
        settings=ray_adapter.TrialSettings(max_epochs=epochs, seed=0, threads=1, pretrained=False),
        resources=ray_adapter.Resources(1, 0, concurrency),
        storage_path=str(tmp / "ray"),
        driver=studies.driver_id(),
        grace_period=1,
        reduction_factor=3,
        trainable=ray_adapter.noop_trainable,
    )
    deadline = Deadline(full_fold_epochs=epochs)  # no deadline: k = 1, all epochs
    ray_adapter.run_trials(run, data, np.zeros(64, np.int64), deadline, Tally(target=trials))
    wall = time.perf_counter() - t0
    n = len(optuna.load_study(study_name=name, storage=storage).trials)
    assert n == trials, f"expected {trials} trials, the study has {n}"
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        url = studies.sqlite_url(Path(tmp) / "bench.db")
        base = _optuna_baseline(url, space, args.trials, args.epochs)
        t0 = time.perf_counter()
        ray_adapter.init_ray(None, 2, 0, verbose=False)
        init = time.perf_counter() - t0
        rows = [("plain optuna study.optimize", base)]
        for c in (1, 2):
            rows.append(
                (
                    f"pcam-search machinery, {c} at once",
                    _ours(url, space, args.trials, args.epochs, c, Path(tmp)),
                )
            )
        ray_adapter.shutdown_ray()
    print(
        f"{args.trials} trivial trials x {args.epochs} epochs, SQLite (WAL); ray.init "
        f"{init:.1f} s once per search (not included below)"
    )
    print(f"{'method':<40}{'wall s':>9}{'s/trial':>10}{'vs optuna':>11}")
    for name, wall in rows:
        print(f"{name:<40}{wall:>9.2f}{wall / args.trials:>10.3f}{wall / base:>10.1f}x")
    print("target: <= 0.100 s/trial")


if __name__ == "__main__":
    main()
