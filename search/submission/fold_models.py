"""The models a refit submits: the search's own fold models (reused), the k fold models
trained again, or full-data models trained on every labelled patch."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from optuna.trial import FrozenTrial
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from data_pipeline.atomic import atomic_path
from data_pipeline.cache import Cache
from search.common.attrs import (
    MODELS_DIR,
)
from search.common.config import weights_arg
from search.common.ensemble import (
    META_FILE,
    load_ensemble,
    load_oof,
    save_ensemble,
)
from search.submission.inputs import RefitConfig, RefitError
from search.training.engine import (
    TrainData,
    TrainParams,
    train_cv,
    train_full,
)


@dataclass
class FoldModels:
    """The fold ensemble a refit submits: saved by the search, or trained now."""

    ens_dir: Path
    oof: np.ndarray  # held-out probabilities of the saved weights, fold-file order
    oof_final: np.ndarray  # same at each fold's last epoch (differs with restore_best)
    oof_best: np.ndarray | None  # at each fold's best epoch (restore_best / patience)
    best_epochs: list[int] | None
    trained: bool  # False: the search's own fold models, no training
    full: bool = False  # full-data models: ``oof`` is the search's fold models' (or NaN)
    epochs_trained: list[int] | None = None  # full-data models: each one's (train_until)


def saved_models(trial: FrozenTrial, cache: Cache, epochs: int, search_epochs: int) -> Path | None:
    """The trial's fold models saved by the search, if they are there and fit this refit."""
    path = trial.user_attrs.get(MODELS_DIR)
    if not path or not (Path(path) / META_FILE).is_file() or epochs != search_epochs:
        return None
    meta = json.loads((Path(path) / META_FILE).read_text())
    return Path(path) if meta.get("dataset_fingerprint") == cache.fingerprint else None


def reuse_saved(saved: Path, out_dir: Path, trial: int) -> FoldModels:
    """Copy the search's fold models into the refit folder (atomically) with their OOF."""
    oof = load_oof(saved)
    if oof is None:
        raise RefitError(f"{saved}: saved without out-of-fold probabilities; use --retrain")
    load_ensemble(saved, "cpu")  # checks every file against its hash before we copy it
    dest = out_dir / "ensemble"
    with atomic_path(dest) as tmp:
        shutil.copytree(saved, tmp)
        meta = json.loads((tmp / META_FILE).read_text())
        (tmp / META_FILE).write_text(json.dumps({**meta, "trial": trial}, indent=2))
    return FoldModels(dest, oof, oof, None, None, trained=False)


def _bars(cfg: RefitConfig, extra: str = "") -> Progress:
    """One progress bar per model trained: "fold 0  [bar]  epoch 3/12 ..." on stderr."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("epoch {task.completed}/{task.total}" + extra),
        TimeElapsedColumn(),
        disable=not cfg.progress,
        console=Console(stderr=True),
    )


def retrain_folds(
    cfg: RefitConfig,
    params: dict,
    data: TrainData,
    folds: np.ndarray,
    epochs: int,
    k: int,
    search_cfg: dict,
    out_dir: Path,
    meta: dict,
) -> FoldModels:
    """Train every fold for the full budget (lockstep), one bar per fold, and save them."""
    with _bars(cfg, "  {task.fields[auc]}") as bar:
        tasks = [bar.add_task(f"fold {f}", total=epochs, auc="") for f in range(k)]

        def on_epoch(epoch: int, m: dict) -> bool:
            for f, t in enumerate(tasks):
                bar.update(t, completed=epoch, auc=f"AUC {m['auc_folds'][f]:.4f}")
            return False

        pretrained = search_cfg.get("pretrained") or None
        res = train_cv(
            params,
            data,
            folds,
            epochs=epochs,
            device=cfg.device,
            seed=cfg.seed,
            pretrained=weights_arg(pretrained),
            on_epoch=on_epoch,
            keep_states=True,
            keep_oof=True,
        )
    p = TrainParams.from_dict(params)
    saved = res.oof_best if p.restore_best else res.oof  # predictions of the saved weights
    # with its OOF, so that ensemble selection (pcam-refit --ensemble) can choose it too
    # keep_states / keep_oof asked for these
    assert res.states is not None and res.oof is not None and saved is not None
    ens_dir = save_ensemble(
        out_dir / "ensemble", res.states, {**meta, "device": res.device}, oof=saved
    )
    oof_best = res.oof_best if p.restore_best or p.patience else None
    return FoldModels(ens_dir, saved, res.oof, oof_best, res.best_epochs, trained=True)


def train_full_models(
    cfg: RefitConfig,
    params: dict,
    data: TrainData,
    epochs: int,
    search_cfg: dict,
    out_dir: Path,
    meta: dict,
    oof: np.ndarray,
) -> FoldModels:
    """Train ``cfg.full_models`` models (seeds) on every labelled row, one bar each, and save
    them. ``oof``: the search's own fold models' held-out probabilities of the same params
    (NaN when they were not kept): the only honest estimate, since nothing is held out."""
    n = cfg.full_models
    trained = [0] * n
    seconds = None if cfg.train_until is None else cfg.train_until - time.monotonic()

    def on_epoch(i: int, epoch: int, total: int) -> None:
        trained[i] = epoch
        bar.update(tasks[i], completed=epoch, total=total)

    with _bars(cfg) as bar:
        tasks = [bar.add_task(f"full-data model {i}", total=epochs) for i in range(n)]
        pretrained = search_cfg.get("pretrained") or None
        states = train_full(
            params,
            data,
            epochs=epochs,
            seeds=[cfg.seed + i for i in range(n)],
            device=cfg.device,
            pretrained=weights_arg(pretrained),
            on_epoch=on_epoch,
            seconds=seconds,
        )
    # no OOF saved with them: ensemble selection must not score them on folds they trained on
    meta = {**meta, "k": n, "full_fit": True, "epochs_trained": trained}
    ens_dir = save_ensemble(out_dir / "ensemble", states, meta)
    return FoldModels(ens_dir, oof, oof, None, None, True, full=True, epochs_trained=trained)


def search_oof(trial: FrozenTrial, cache: Cache, n: int) -> np.ndarray:
    """The trial's kept fold models' out-of-fold probabilities, or NaN (not kept)."""
    saved = saved_models(trial, cache, 0, 0)  # None when not kept (or for other data)
    oof = load_oof(saved) if saved else None
    return oof if oof is not None and len(oof) == n else np.full(n, np.nan, np.float32)
