"""A trial's resumable state, so that an interrupted trial continues where it stopped.

After a report ``train_cv`` (given ``checkpoint=``) writes every fold's state
(``Fold.state_dict``: weights, optimizer, schedule, scaler, EMA, random stream, best-so-far),
the shared out-of-fold arrays, the clock and the reports so far, atomically. A later
``train_cv`` with the same file and the same trial replays the saved reports (so the trial's
curve is whole) and trains on from the next step: no finished epoch is trained twice, and on
the same device type the result equals an uninterrupted run's. The file is read with torch's
weights-only loader (tensors, numbers, lists and dicts; no code runs on load).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from data_pipeline.atomic import atomic_path

if TYPE_CHECKING:
    from search.training.fold import Clock, Fold, Run

VERSION = 1
SUFFIX = ".pt"
RESUMED = "resumed_from"  # in each report of a resumed trial: the fold-epochs it resumed at
CHECKPOINTS_DIR = "checkpoints"  # in studies/<study>/: one file per trial that may resume
# a checkpoint is written after a report while writing them has taken at most this share of
# the trial's time: after every report for small models (milliseconds each); less often
# where a write is long next to an epoch (large models, many folds, a slow disk)
SHARE = 0.05
SHARE_ENV = "PCAM_CHECKPOINT_SHARE"  # another share (1: after every report, as tests want)


def write_share() -> float:
    """The share of a trial's time checkpoints may take: ``SHARE``, or the value of
    ``PCAM_CHECKPOINT_SHARE`` where set."""
    return float(os.environ.get(SHARE_ENV, SHARE))


def checkpoint_key(params: dict, **context: object) -> str:
    """A file name for a trial: the same params trained the same way (seed, epochs, racing,
    data and folds in ``context``) get the same key; anything else another."""
    text = json.dumps({"params": params, **context}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def save(
    path: Path,
    step: int,
    n_steps: int,
    history: list[dict],
    runs: list[Fold],
    run: Run,
    clock: Clock,
    elapsed: float,
) -> None:
    """The state after step ``step`` (of ``n_steps``) of ``fold_steps``, written atomically."""
    state = {
        "version": VERSION,
        "step": step,
        "n_steps": n_steps,
        "history": history,
        "folds": [r.state_dict() for r in runs],
        "oof": torch.from_numpy(run.oof.copy()),
        "oof_best": torch.from_numpy(run.oof_best.copy()),
        "clock": [clock.seconds, clock.images],
        "elapsed": elapsed,
    }
    with atomic_path(Path(path)) as tmp:
        torch.save(state, tmp)


def restore(
    path: Path, n_steps: int, runs: list[Fold], run: Run, clock: Clock
) -> tuple[int, list[dict], float] | None:
    """Load ``path`` into the folds, ``run`` and ``clock``: (next step, the reports so far,
    seconds the trial had run), or None when there is no usable checkpoint (none, another
    version or schedule, or unreadable: the trial then starts from scratch)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a torn or foreign file: training from scratch is always correct
        return None
    if state.get("version") != VERSION or state.get("n_steps") != n_steps:
        return None
    if len(state["folds"]) != len(runs) or len(state["oof"]) != len(run.oof):
        return None
    for r, fold_state in zip(runs, state["folds"], strict=True):
        r.load_state_dict(fold_state)
    run.oof[:] = np.asarray(state["oof"])
    run.oof_best[:] = np.asarray(state["oof_best"])
    clock.seconds, clock.images = (float(v) for v in state["clock"])
    return int(state["step"]) + 1, list(state["history"]), float(state["elapsed"])
