"""``run_trials``: one search on Ray Tune, from the study and the data to the last trial."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import ray
from ray import tune
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from search.training.engine import TrainData
from search.tuning.deadline import Deadline
from search.tuning.progress import Tally
from search.tuning.ray_adapter.cluster import dead_local_processes
from search.tuning.ray_adapter.searcher import (
    MACHINERY_SLACK,
    _DeadlineStopper,
    _RecordingASHA,
    _TrialRegistry,
    _TruthfulSearch,
)
from search.tuning.ray_adapter.trial import (
    METRIC,
    TIME_ATTR,
    Resources,
    TrialSettings,
    _trainable,
    start_sink,
    trial_checkpoint,
)


@dataclass(frozen=True)
class SearchRun:
    """What one ``run_trials`` call runs: the study and its sampler, how many trials, how
    each trains and on what resources, ASHA's schedule, and where Ray writes."""

    study: optuna.Study
    storage: optuna.storages.BaseStorage
    space_fn: Callable[[optuna.Trial], dict]
    sampler: optuna.samplers.BaseSampler
    n_trials: int  # finished trials wanted (Tally.target)
    settings: TrialSettings
    resources: Resources
    storage_path: str  # Ray's experiment folders
    driver: dict  # studies.driver_id(): who runs the search, for the trials' attrs
    grace_period: int = 1  # ASHA, in fold-epochs
    reduction_factor: int = 3
    asha: bool = True
    promote_to: int = 0  # the growing top rung's longest trial, epochs (0: no promotions)
    keep_top: int = 10  # COMPLETE trials whose fold models stay on disk
    verbose: bool = False
    trainable: Callable = _trainable
    log_file: str | None = None  # not verbose: Ray Tune's own error logs go here, not stderr


def run_trials(
    run: SearchRun, data: TrainData, folds: np.ndarray, deadline: Deadline, tally: Tally
) -> _TruthfulSearch:
    """Run ``run.n_trials`` more trials of ``run.study`` on the Ray instance ``init_ray``
    joined.

    ASHA's grace period and rungs count fold-epochs. ``deadline`` (its ``full_fold_epochs`` =
    k x max_epochs) decides when to stop starting trials and when the run ends. Returns the
    searcher (its ``study`` is the live study). Trials left open by an interrupted run are
    closed as FAIL (interrupted) before returning or raising.
    """
    stopped: set[str] = set()
    registry = _TrialRegistry()
    t0 = time.monotonic()
    k = int(np.max(folds)) + 1
    searcher = _searcher(run, deadline, tally, t0, stopped, registry, k)
    settings, sink = _with_sink(run.settings)
    trainable = tune.with_resources(
        tune.with_parameters(run.trainable, data=data, folds=folds, settings=settings),
        {"cpu": run.resources.cpus_per_trial, "gpu": run.resources.gpus_per_trial},
    )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=_scheduler(run, deadline, stopped),
            metric=METRIC,
            mode="max",
            # the searcher ends the run at n_trials finished; the slack lets it replace trials
            # the machinery interrupted (a dead worker: not counted, queued again on resume)
            num_samples=run.n_trials + max(run.n_trials, MACHINERY_SLACK),
            max_concurrent_trials=run.resources.concurrency,
            reuse_actors=True,  # measured 8x less overhead per trial (NOTES.md)
        ),
        run_config=tune.RunConfig(
            name=f"run-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=run.storage_path,
            verbose=1 if run.verbose else 0,
            callbacks=[registry],
            stop=_DeadlineStopper(deadline, t0, tally, dead_local_processes),
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
        ),
    )
    try:
        with _tune_logs_to(None if run.verbose else run.log_file):
            tuner.fit()
    finally:
        if sink is not None:  # every trial has ended: no write is in flight
            ray.kill(sink)
        searcher.close_open_trials(
            "the run reached its deadline before the trial finished"
            if deadline.active and deadline.expired(time.monotonic() - t0)
            else "the search was interrupted before the trial finished"
        )
    return searcher


def _searcher(
    run: SearchRun,
    deadline: Deadline,
    tally: Tally,
    t0: float,
    stopped: set[str],
    registry: _TrialRegistry,
    k: int,
) -> _TruthfulSearch:
    return _TruthfulSearch(
        space=run.space_fn,
        metric=METRIC,
        mode="max",
        sampler=run.sampler,
        study_name=run.study.study_name,
        storage=run.storage,
        max_epochs=run.settings.max_epochs,
        full_fold_epochs=deadline.full_fold_epochs,
        deadline=deadline,
        t0=t0,
        stopped_early=stopped,
        registry=registry,
        tally=tally,
        driver=run.driver,
        keep_top=run.keep_top,
        promote_to=run.promote_to,
        eta=run.reduction_factor,
        checkpoint_of=lambda config: trial_checkpoint(run.settings, config, k),
    )


def _scheduler(run: SearchRun, deadline: Deadline, stopped: set[str]) -> TrialScheduler:
    if not run.asha:
        return FIFOScheduler()
    return _RecordingASHA(
        stopped,
        time_attr=TIME_ATTR,
        max_t=deadline.full_fold_epochs,
        grace_period=min(run.grace_period, deadline.full_fold_epochs),
        reduction_factor=run.reduction_factor,
    )


def _with_sink(settings: TrialSettings) -> tuple[TrialSettings, Any]:
    """On a cluster, kept models reach this node's disk through a sink actor; on one node the
    trials write them directly (an actor's start would delay the first trials ~seconds)."""
    alive = [n for n in ray.nodes() if n.get("Alive")]
    if settings.models_dir is None or len(alive) < 2:
        return settings, None
    sink = start_sink(str(Path(settings.models_dir).resolve()))
    return replace(settings, sink=sink), sink


@contextlib.contextmanager
def _tune_logs_to(path: str | None) -> Iterator[None]:
    """Ray Tune logs a failed trial's traceback at ERROR on the console; the study already
    records the error (and the live view shows it), so without --verbose the traceback goes
    to ``path`` (the run's log file) instead."""
    if path is None:
        yield
        return
    tune_log = logging.getLogger("ray.tune")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    tune_log.addHandler(handler)
    propagate, tune_log.propagate = tune_log.propagate, False
    try:
        yield
    finally:
        tune_log.propagate = propagate
        tune_log.removeHandler(handler)
        handler.close()
