"""The cross-validation training engine: the only code in the project that trains a model.

``train_cv(params, data, folds, epochs=...)`` trains one model per fold. Each fold is a
``search.training.fold.Fold`` (model, optimizer, schedule, RNG, rows, latest metrics, best-so-
far) with ``train_epoch()`` and ``score()``; ``train_cv`` only decides the order and reports.
Lockstep (refit, default): after epoch e every fold has trained e epochs and been scored on its
held-out part. Fold racing (the search): fold 0 trains epoch 1 alone, the other folds catch up
one at a time, then lockstep; each report says how many folds it averages and the fold-epochs
spent, so a scheduler can drop a poor trial after one fold-epoch. Read ``train_cv`` top to
bottom: set up data and folds, then loop epochs -> fold groups -> report.

Data (``search.training.batches``): the cache's uint8 patches stay in its memory-mapped file
(``PoolImages``): the OS page cache holds them once per machine for every trial; each batch
gathers its random rows and crops them, a batch ahead in a background thread on CUDA. On a GPU
whose trial share has room (the memory plan, ``search.training.device``) the cropped pool is
copied to the device once per trial and batches are gathered there. Batches are augmented as
whole tensors (``search.training.augment``); a training step makes no blocking host<->device
transfer. CUDA: autocast in bf16 where native, else fp16 with loss scaling; channels_last;
cuDNN autotuning. CPU: channels_last too (measured faster with oneDNN), ``threads`` threads,
bf16 autocast on CPUs with AMX units (``cpu_bf16``; ``PCAM_AMP=off`` for fp32).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

import models
from search.training import checkpoint as ckpt
from search.training.batches import Batcher, first_line
from search.training.data import PROBE_BYTES, PoolImages, TrainData  # noqa: F401
from search.training.device import (
    AMP_ENV,
    PoolPlan,
    configure,
    cpu_bf16,
    estimate_trial_bytes,
    plan_pool,
    pool_bytes,
    precision,
    release,
    share_bytes,
)
from search.training.fold import Clock, Fold, Run, create_model, resolve_device
from search.training.params import (  # noqa: F401  (re-exported: callers import them here)
    CROPS,
    LOSSES,
    MIN_DELTA,
    MIXES,
    ONECYCLE_PCT,
    OPTIMIZERS,
    SCHEDULES,
    TrainParams,
)
from search.training.results import CVResult, TrialOutOfMemory

__all__ = ["AMP_ENV", "cpu_bf16", "precision"]  # re-exported: callers import them from here


def plan_pool_for(p: TrainParams, n: int, k: int, dev: torch.device, gpu_share: float) -> PoolPlan:
    """Where a trial of ``p`` with k folds over ``n`` patches keeps its pool on ``dev``: the
    memory plan on CUDA (``search.training.device.plan_pool``), the host elsewhere."""
    if dev.type != "cuda":
        return PoolPlan("host", "not a GPU: batches gather from the memory-mapped cache")
    with torch.device("meta"):  # shapes only: no memory, no weights read
        model = create_model(p).to(memory_format=torch.channels_last)
    trial = estimate_trial_bytes(model, p.optimizer, p.ema > 0, k, p.batch_size, p.crop)
    return plan_pool(share_bytes(dev, gpu_share), pool_bytes(n, p.crop), trial)


def fold_steps(k: int, epochs: int, race_epochs: int = 0) -> list[tuple[list[int], int]]:
    """The training order: (folds, epoch) steps, each followed by one report.

    A step trains each of its folds up to ``epoch``. Lockstep (``race_epochs`` 0): all k folds,
    one epoch per step. Racing: fold 0 alone for its first ``race_epochs`` epochs (one report
    each), then each other fold catches up to that epoch in one step (a report of the mean over
    the folds trained so far), then all k folds in lockstep. Steps list folds in order.
    """
    r = min(race_epochs, epochs)
    steps = [([0], e) for e in range(1, r + 1)] + [([f], r) for f in range(1, k)] if r else []
    return steps + [(list(range(k)), e) for e in range(r + 1, epochs + 1)]


def train_cv(
    params: dict | TrainParams,
    data: TrainData,
    folds: np.ndarray,
    *,
    epochs: int,
    device: str | torch.device | None = None,
    seed: int = 0,
    threads: int | None = None,
    pretrained: bool | str = False,
    on_epoch: Callable[[int, dict], bool] | None = None,
    keep_states: bool = False,
    keep_oof: bool = False,
    eval_batch: int = 1024,
    race_epochs: int = 0,
    gpu_share: float = 1.0,
    pool: str | None = None,
    checkpoint: str | Path | None = None,
) -> CVResult:
    """Train one model per fold and score every fold's held-out part after each of its epochs.

    ``folds[i]`` is the fold (0..k-1) of ``data`` row i. Lockstep (default): after each epoch
    all k folds have trained it, and ``on_epoch(epoch, metrics)`` sees the mean over k folds.
    ``race_epochs=r`` (fold racing, the search's default): fold 0 trains its first r epochs
    alone, reported after each, then the other folds catch up to epoch r one report at a time
    (``metrics["folds"]`` says how many folds a mean covers, ``metrics["fold_epochs"]`` the
    fold-epochs spent), then lockstep (``fold_steps``). ``on_epoch`` returning True stops all
    folds. Raises ``TrialDiverged`` on a non-finite loss and ``TrialOutOfMemory`` on CUDA OOM,
    with the epoch and params.

    ``gpu_share``: the trial's share of the GPU (``--gpus-per-trial``), what the memory plan
    (``plan_pool_for``) may use; ``pool`` ("device"/"host") overrides the plan. A device
    pool that runs out of memory before the first report is dropped and the trial restarts
    on the host path (same seeds, so the same result), saying so in ``CVResult.pool_note``.

    ``checkpoint``: a file (``search.training.checkpoint``) the state is saved to after every
    report; when it already holds this trial's state, the saved reports are replayed to
    ``on_epoch`` and training continues from the next step (nothing trained twice).
    """
    p = params if isinstance(params, TrainParams) else TrainParams.from_dict(params)
    dev = resolve_device(device)
    configure(dev, threads)
    folds = np.asarray(folds)
    k = int(folds.max()) + 1
    place = plan_pool_for(p, len(data.labels), k, dev, gpu_share).where if pool is None else pool
    ckpt_path = None if checkpoint is None else Path(checkpoint)
    args = (p, data, folds, epochs, dev, seed, pretrained, on_epoch, eval_batch, race_epochs)
    trained, note = _host_if_pool_oom(lambda where: _train_cv(*args, ckpt_path, where), place, dev)
    return _finish(trained, keep_states, keep_oof, note)


_T = TypeVar("_T")


class _PoolOutOfMemory(RuntimeError):
    """CUDA ran out of memory with the pool on the device, before anything was reported."""


def _host_if_pool_oom(train: Callable[[str], _T], place: str, dev: torch.device) -> tuple[_T, str]:
    """(``train(place)``, "") - or, when the device pool ran out of memory before the first
    report, (``train("host")``, why): same seeds, same result. The device's cached blocks
    are released after either (reused Ray actors: the next trial finds them free)."""
    try:
        try:
            return train(place), ""
        except _PoolOutOfMemory as e:
            release(dev)
            note = f"the device pool ran out of memory before the first report ({e}): host path"
            logging.getLogger(__name__).warning(note)
            return train("host"), note
    finally:
        release(dev)


@dataclass
class _Trained:
    """What ``_train_cv`` leaves for ``_finish``: the folds and their shared state."""

    runs: list
    run: Run
    history: list[dict]
    stopped: bool
    epochs: int
    t_start: float


def _train_cv(
    p: TrainParams,
    data: TrainData,
    folds: np.ndarray,
    epochs: int,
    dev: torch.device,
    seed: int,
    pretrained: bool | str,
    on_epoch: Callable[[int, dict], bool] | None,
    eval_batch: int,
    race: int,
    checkpoint: Path | None,
    place: str,
) -> _Trained:
    """``train_cv``'s loop with the pool at ``place``; returns the trained folds."""
    k = int(folds.max()) + 1
    t_start = time.perf_counter()
    epoch, stopped, batch = 0, False, None
    history: list[dict] = []
    try:
        runs = [Fold(f, p, folds, epochs, seed, dev, pretrained) for f in range(k)]
        norm = models.data_config(runs[0].model, p.arch)
        batch = Batcher(data.images, data.labels, p.crop, dev, norm["mean"], norm["std"], place)
        run = Run(p, dev, batch, data.labels)
        clock = Clock()
        steps = fold_steps(k, epochs, race)
        start, history, stopped, t_start = _resume(checkpoint, steps, runs, run, clock, on_epoch)
        ckpt_s, share = 0.0, ckpt.write_share()  # seconds spent writing checkpoints, at most
        todo = [] if stopped else list(enumerate(steps))[start:]  # a replay may have stopped it
        for i, (group, epoch) in todo:
            clock.new_step()
            for f in group:
                runs[f].train_to(run, epoch, clock, eval_batch)
            seen = runs[: group[-1] + 1]  # folds that have reached this epoch (steps go in order)
            history.append(_metrics(epoch, seen, runs, p, clock, t_start))
            if start:
                history[-1][ckpt.RESUMED] = history[start - 1][ckpt.RESUMED]
            if checkpoint is not None and ckpt_s <= share * (time.perf_counter() - t_start):
                t0 = time.perf_counter()  # before the report: a report is never lost
                ckpt.save(checkpoint, i, len(steps), history, runs, run, clock, t0 - t_start)
                ckpt_s += time.perf_counter() - t0
            if on_epoch is not None and on_epoch(epoch, history[-1]) and i < len(steps) - 1:
                stopped = True
                break
            if len(seen) == k and not any(r.active for r in runs):  # all early-stopped
                break
    except torch.cuda.OutOfMemoryError as e:
        if batch is not None and batch.place == "device" and not history:
            raise _PoolOutOfMemory(first_line(e)) from e
        raise TrialOutOfMemory(f"CUDA out of memory ({e})", epoch, asdict(p)) from e
    return _Trained(runs, run, history, stopped, epochs, t_start)


def _resume(
    checkpoint: Path | None,
    steps: list[tuple[list[int], int]],
    runs: list[Fold],
    run: Run,
    clock: Clock,
    on_epoch: Callable[[int, dict], bool] | None,
) -> tuple[int, list[dict], bool, float]:
    """(first step to train, reports so far, stopped, t_start) - from ``checkpoint`` when it
    holds this trial's state: its reports are replayed to ``on_epoch`` (a scheduler may stop
    the trial on them, as it would have), and the clock goes on from the seconds spent."""
    saved = None if checkpoint is None else ckpt.restore(checkpoint, len(steps), runs, run, clock)
    if saved is None:
        return 0, [], False, time.perf_counter()
    start, history, elapsed = saved
    # every report of a resumed trial says where it resumed (what was not trained now)
    history = [{**m, ckpt.RESUMED: history[-1]["fold_epochs"]} for m in history]
    for i, m in enumerate(history):
        if on_epoch is not None and on_epoch(m["epoch"], m) and i < len(steps) - 1:
            return start, history, True, time.perf_counter() - elapsed
    return start, history, False, time.perf_counter() - elapsed


def _metrics(
    epoch: int, seen: list[Fold], runs: list[Fold], p: TrainParams, clock: Clock, t_start: float
) -> dict:
    """One report: means over the folds in ``seen`` (all trained to ``epoch``, or stopped)."""
    aucs = [r.best_auc if p.restore_best and not r.active else r.auc for r in seen]
    losses, accs = [r.loss for r in seen], [r.acc for r in seen]
    train = [r.train_loss for r in seen]
    return {
        "epoch": epoch,
        "folds": len(seen),  # how many folds the means below average
        # compute spent, in fold-epochs: as scheduled (an early-stopped fold counts as trained,
        # so the clock is the same for every trial at the same point of the schedule)
        "fold_epochs": sum(epoch if r in seen else _reached(r, epoch) for r in runs),
        "auc": float(np.mean(aucs)),
        "auc_folds": aucs,
        "val_loss": float(np.mean(losses)),
        "val_loss_folds": losses,
        "acc": float(np.mean(accs)),
        "acc_folds": accs,
        "train_loss": float(np.mean(train)),
        "train_loss_folds": train,
        "lr": seen[0].sched.get_last_lr()[0],
        "seconds": time.perf_counter() - t_start,
        "train_images_per_s": clock.images / max(clock.seconds, 1e-9),  # all so far
        "epoch_images_per_s": clock.last_images / max(clock.last_seconds, 1e-9),  # last step
        "folds_active": sum(r.active for r in seen),
        "best_epochs": [r.best_epoch for r in seen],
        "self_stopped": len(seen) == len(runs) and not any(r.active for r in seen),
    }


def _reached(r: Fold, epoch: int) -> int:
    """Fold-epochs a fold not yet caught up has trained (its own epochs, at most ``epoch``)."""
    return min(r.epoch, epoch)


def _finish(t: _Trained, keep_states: bool, keep_oof: bool, note: str = "") -> CVResult:
    runs, run, history, p = t.runs, t.run, t.history, t.run.p
    if p.restore_best:
        for r in runs:
            if r.best_state is not None:
                r.scored.load_state_dict(r.best_state)
    states = None
    if keep_states:
        states = [{n: v.detach().cpu() for n, v in r.scored.state_dict().items()} for r in runs]
    last_epoch = history[-1]["epoch"] if history else 0
    dev = run.dev
    return CVResult(
        history=history,
        stopped_early=t.stopped,
        self_stopped=not t.stopped and last_epoch < t.epochs and not any(r.active for r in runs),
        best_epochs=[r.best_epoch for r in runs],
        oof_best=run.oof_best if keep_oof else None,
        seconds=time.perf_counter() - t.t_start,
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev),
        states=states,
        oof=run.oof if keep_oof else None,
        pool=run.batch.place,
        pool_note=note or run.batch.note,
    )


def epochs_that_fit(done: int, planned: int, seconds_per_epoch: float, left_s: float) -> int:
    """A schedule's length in epochs once ``done`` of ``planned`` are trained and ``left_s``
    seconds remain at ``seconds_per_epoch``: ``planned`` if the rest fits, else fewer, but
    at least one more, so the lr still anneals to its end (a model cut mid-schedule would
    be submitted at a high lr)."""
    if done >= planned:
        return done
    fit = done + int(max(left_s, 0.0) // max(seconds_per_epoch, 1e-9))
    return max(done + 1, min(planned, fit))


def train_full(
    params: dict | TrainParams,
    data: TrainData,
    *,
    epochs: int,
    seeds: list[int] | tuple[int, ...] = (0,),
    device: str | torch.device | None = None,
    threads: int | None = None,
    pretrained: bool | str = False,
    on_epoch: Callable[[int, int, int], None] | None = None,
    seconds: float | None = None,
) -> list[dict]:
    """Train one model per seed on every row of ``data`` for ``epochs``; their CPU state_dicts.

    Nothing is held out, so nothing is scored: these are final models whose quality was
    estimated by the cross-validation of the same params (the fold models). ``on_epoch(i,
    epoch, epochs_i)`` is called after epoch ``epoch`` of model ``i``, whose schedule is
    ``epochs_i`` long. ``seconds``: wall time all models may take (a ``--budget``'s
    reserve); when a model's pace says its epochs would run past its equal share, its
    schedule is shortened to what fits (``epochs_that_fit``). Raises like ``train_cv``.
    """
    p = params if isinstance(params, TrainParams) else TrainParams.from_dict(params)
    dev = resolve_device(device)
    configure(dev, threads)
    place = plan_pool_for(p, len(data.labels), 1, dev, 1.0).where
    args = (p, data, epochs, seeds, dev, pretrained, on_epoch, seconds)
    return _host_if_pool_oom(lambda where: _train_full(*args, where), place, dev)[0]


def _train_full(
    p: TrainParams,
    data: TrainData,
    epochs: int,
    seeds: list[int] | tuple[int, ...],
    dev: torch.device,
    pretrained: bool | str,
    on_epoch: Callable[[int, int, int], None] | None,
    seconds: float | None,
    place: str,
) -> list[dict]:
    """``train_full``'s loop with the pool at ``place``."""
    every = np.ones(len(data.labels), np.int64)  # "fold 0" then trains on every row
    states, batch, run = [], None, None
    t0 = time.perf_counter()
    try:
        for i, seed in enumerate(seeds):
            fold = Fold(0, p, every, epochs, seed, dev, pretrained)
            if run is None:
                norm = models.data_config(fold.model, p.arch)
                m, sd = norm["mean"], norm["std"]
                batch = Batcher(data.images, data.labels, p.crop, dev, m, sd, place)
                run = Run(p, dev, batch, data.labels)
            t_start = time.perf_counter()
            while fold.epoch < fold.epochs:
                fold.train_epoch(run)
                # model i ends by its share, (i + 1) / n of the seconds; a schedule that has
                # run to its end stays ended (its lr is at 0)
                if seconds is not None and fold.epoch < fold.epochs:
                    now = time.perf_counter()
                    left = t0 + seconds * (i + 1) / len(seeds) - now
                    per_epoch = (now - t_start) / max(1, fold.epoch - 1)
                    # the plan, not the last length, caps it: the pace can recover
                    fold.epochs = epochs_that_fit(fold.epoch, epochs, per_epoch, left)
                if fold.epoch == 1:  # the pace is timed from here: epoch 1 has one-off setup
                    t_start = time.perf_counter()
                if on_epoch is not None:
                    on_epoch(i, fold.epoch, fold.epochs)
            states.append({n: v.detach().cpu() for n, v in fold.scored.state_dict().items()})
    except torch.cuda.OutOfMemoryError as e:
        if batch is not None and batch.place == "device" and not states and fold.epoch == 0:
            raise _PoolOutOfMemory(first_line(e)) from e
        raise TrialOutOfMemory(f"CUDA out of memory ({e})", epochs, asdict(p)) from e
    return states
