"""``run_trials``: one search on Ray Tune, from the study and the data to the last trial."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna
import ray
from ray import tune
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from search.training.engine import TrainData
from search.tuning.deadline import Deadline
from search.tuning.progress import Tally
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
)


def run_trials(
    *,
    study: optuna.Study,
    storage: optuna.storages.BaseStorage,
    space_fn: Callable[[optuna.Trial], dict],
    sampler: optuna.samplers.BaseSampler,
    n_trials: int,
    data: TrainData,
    folds: np.ndarray,
    settings: TrialSettings,
    resources: Resources,
    grace_period: int,
    reduction_factor: int,
    asha: bool,
    deadline: Deadline,
    tally: Tally,
    driver: dict,
    storage_path: str,
    verbose: bool,
    trainable: Callable = _trainable,
    keep_top: int = 10,
) -> _TruthfulSearch:
    """Run ``n_trials`` more trials of ``study`` on the Ray instance ``init_ray`` joined.

    ASHA's grace period and rungs count fold-epochs. ``deadline`` (its ``full_fold_epochs`` =
    k x max_epochs) decides when to stop starting trials and when the run ends. Returns the
    searcher (its ``study`` is the live study). Trials left open by an interrupted run are
    closed as FAIL (interrupted) before returning or raising.
    """
    stopped: set[str] = set()
    registry = _TrialRegistry()
    t0 = time.monotonic()
    searcher = _TruthfulSearch(
        space=space_fn,
        metric=METRIC,
        mode="max",
        sampler=sampler,
        study_name=study.study_name,
        storage=storage,
        max_epochs=settings.max_epochs,
        full_fold_epochs=deadline.full_fold_epochs,
        deadline=deadline,
        t0=t0,
        stopped_early=stopped,
        registry=registry,
        tally=tally,
        driver=driver,
        keep_top=keep_top,
    )
    scheduler: TrialScheduler
    if asha:
        scheduler = _RecordingASHA(
            stopped,
            time_attr=TIME_ATTR,
            max_t=deadline.full_fold_epochs,
            grace_period=min(grace_period, deadline.full_fold_epochs),
            reduction_factor=reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    sink = None
    alive = [n for n in ray.nodes() if n.get("Alive")]
    if settings.models_dir is not None and len(alive) > 1:
        # a cluster: kept models reach this node's disk through the sink; on one node the
        # trials write them directly (an actor's start would delay the first trials ~seconds)
        sink = start_sink(str(Path(settings.models_dir).resolve()))
        settings = replace(settings, sink=sink)
    trainable = tune.with_resources(
        tune.with_parameters(trainable, data=data, folds=folds, settings=settings),
        {"cpu": resources.cpus_per_trial, "gpu": resources.gpus_per_trial},
    )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            metric=METRIC,
            mode="max",
            # the searcher ends the run at n_trials finished; the slack lets it replace trials
            # the machinery interrupted (a dead worker: not counted, queued again on resume)
            num_samples=n_trials + max(n_trials, MACHINERY_SLACK),
            max_concurrent_trials=resources.concurrency,
            reuse_actors=True,  # measured 8x less overhead per trial (NOTES.md)
        ),
        run_config=tune.RunConfig(
            name=f"run-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=storage_path,
            verbose=1 if verbose else 0,
            callbacks=[registry],
            stop=_DeadlineStopper(deadline, t0, tally),
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
        ),
    )
    try:
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
