"""What a refit starts from: its config (``RefitConfig``), the trial it refits, and the data,
folds and study opened once (``Setup``); the record it returns (``RefitResult``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from data_pipeline.cache import Cache
from data_pipeline.dataset import DataConfig, open_dataset
from data_pipeline.folds import folds_file, folds_for_cache
from data_pipeline.synth import SynthConfig
from search.common import study as studies
from search.common.attrs import (
    CONFIG,
    DATASET_FINGERPRINT,
    SPACE,
    get_record,
)
from search.training.engine import (
    TrainData,
    TrainParams,
)


class RefitError(ValueError):
    """The refit cannot run as asked (no COMPLETE trial, data changed, ids mismatch, ...)."""


@dataclass(frozen=True)
class RefitConfig:
    """One ``pcam-refit`` run."""

    study: str = "pcam"
    storage: str = ""  # "" = sqlite:///<studies_dir>/pcam.db, as pcam-search
    studies_dir: Path = Path("studies")
    trial: int | None = None  # None = the best COMPLETE trial
    epochs: int | None = None  # None = the study's max_epochs
    tta: int = 8  # dihedral views per patch at test time: 1, 4 or 8
    data: Path | None = None  # None = the data the study was searched on
    cache_dir: Path | None = None
    out: Path | None = None  # submission path; None = <refit folder>/submission.csv
    force: bool = False  # overwrite an existing submission
    retrain: bool = False  # train the fold models again instead of reusing the search's
    # > 0: instead of k fold models, this many models (seeds) trained on every labelled row
    # (no held-out part: the CV estimate is the search's, of the same params). At one cost,
    # one full-data model trains 2x the epochs of k = 3 fold models (docs/benchmarks.md,
    # "The final model")
    full_models: int = 0
    # --budget, full-data models: time.monotonic() by which their training must end (the
    # budget less predicting and writing); their schedules shorten to fit. None = no limit
    train_until: float | None = None
    other_data: bool = False  # allow data whose fingerprint differs from the study's
    # pcam-refit's default: plan the final model (``plan_final``): the params trained on every
    # labelled row for the final model's epochs (fit to ``seconds`` when given), or the
    # search's own fold models when no more epochs than the search's fit
    final: bool = False
    seconds: float | None = None  # --time: the whole refit ends within this, from t_start
    t_start: float | None = None  # time.monotonic() when the command started
    final_plan: FinalPlan | None = None  # set by refit() when ``final``
    device: str | None = None  # None = CUDA when present
    seed: int = 0
    progress: bool = True

    @property
    def storage_url(self) -> str:
        return studies.default_storage_url(self.storage, self.studies_dir)


@dataclass
class RefitResult:
    trial: int
    params: dict
    oof_auc: float
    oof_auc_folds: list[float]
    oof_auc_best: float | None  # at each fold's best epoch (early stopping / restore_best)
    best_epochs: list[int] | None
    test_auc: float | None
    # each saved fold model alone on the test set, one view
    test_auc_folds: list[float] | None
    # mean per-fold held-out AUC of the saved models minus the mean of test_auc_folds: how much
    # validation flatters (> 0) or undersells (< 0) the same models on unseen slides
    validation_gap: float | None
    ensemble_dir: Path
    oof_csv: Path | None
    submission: Path | None
    seconds: dict = field(default_factory=dict)
    layout: str | None = None  # the data's layout ("kaggle": the submission is for Kaggle)
    path: str = "reuse"  # "full", "reuse" or "retrain": which models were submitted


def pick_trial(study: optuna.Study, number: int | None) -> FrozenTrial:
    """The best COMPLETE trial, or trial ``number`` if COMPLETE; never a pruned or failed one."""
    if number is None:
        best = studies.best_trial(study)
        if best is None:
            raise RefitError(f"study {study.study_name!r} has no COMPLETE trial to refit yet")
        return best
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        raise RefitError(f"study {study.study_name!r} has no trial {number}")
    t = trials[number]
    if t.state != TrialState.COMPLETE:
        raise RefitError(f"trial {number} is {t.state.name}: only COMPLETE trials are refit")
    return t


def trial_params(study: optuna.Study, trial: FrozenTrial) -> dict:
    """The full training params of a trial: the space's fixed values + the trial's params."""
    space = get_record(study, SPACE, {})
    params = {**space.get("fixed", {}), **trial.params}
    TrainParams.from_dict(params)  # a clear error if the study holds params we cannot train
    return params


def data_config(search_cfg: dict, cfg: RefitConfig) -> DataConfig:
    """The search's data (or ``cfg.data``), as a DataConfig."""
    d = search_cfg.get("data", {})
    emb = d.get("embedded") or {}
    return DataConfig(
        data=cfg.data if cfg.data is not None else (Path(d["data"]) if d.get("data") else None),
        cache_dir=cfg.cache_dir or (Path(d["cache_dir"]) if d.get("cache_dir") else None),
        skip_bad=bool(d.get("skip_bad", False)),
        embedded=SynthConfig(**emb) if emb else SynthConfig(),
    )


@dataclass
class Setup:
    """What every refit starts from: the study, its search config, and the same data and
    folds the search used."""

    study: optuna.Study
    search_cfg: dict
    cache: Cache
    data: TrainData
    folds: np.ndarray  # (N,) fold of each labelled row, fold-file order
    k: int
    folds_file: str
    other_data: bool = False  # the data differs from the study's (--other-data)


def check_outputs_writable(cfg: RefitConfig) -> None:
    """Before any work: the study (its ``refit`` attr) and the refit's folders can be written;
    a ``StorageError`` naming the read-only folder otherwise."""
    studies.check_storage(cfg.storage_url, write=True)
    studies.check_writable(Path(cfg.studies_dir) / cfg.study / "refit", "pcam-refit")
    if cfg.out is not None:
        studies.check_writable(Path(cfg.out).parent, "the submission")


def open_setup(cfg: RefitConfig) -> Setup:
    """Load the study and its data (its content fingerprint must be the study's, unless
    ``cfg.other_data`` says different data is meant) and rebuild its folds."""
    storage = studies.open_existing(cfg.storage_url)
    try:
        study = optuna.load_study(study_name=cfg.study, storage=storage)
    except KeyError:
        raise RefitError(
            f"no study {cfg.study!r} in {studies.safe_url(cfg.storage_url)}; run pcam-search first"
        ) from None
    search_cfg = get_record(study, CONFIG, {})
    k = int(search_cfg.get("folds", 3))
    cache = open_dataset(data_config(search_cfg, cfg), progress=cfg.progress)
    want_fp = study.user_attrs.get(DATASET_FINGERPRINT)
    differs = bool(want_fp) and cache.fingerprint != want_fp
    if differs and not cfg.other_data:  # the same check with or without --data
        raise RefitError(
            f"the study was searched on dataset {want_fp}, the data now reads "
            f"{cache.fingerprint} (ids, labels, slides or pixels differ): pass --other-data to "
            "refit on different data (recorded in refit.json)"
        )
    fold_seed = int(search_cfg.get("fold_seed", 0))
    strategy = search_cfg.get("fold_strategy", "slide")
    folds_df = folds_for_cache(cache, k, fold_seed, strategy)
    data = TrainData.from_cache(cache, folds_df["row"].to_numpy())
    where = str(folds_file(cache, k, fold_seed, strategy))
    fold = folds_df["fold"].to_numpy(np.int64)
    return Setup(study, search_cfg, cache, data, fold, k, where, differs)


@dataclass(frozen=True)
class FinalPlan:
    """What ``pcam-refit`` builds by default: ``path`` "full" (``models`` seeds on every
    labelled row, ``epochs`` each) or "reuse" (the search's own fold models); ``why``."""

    path: str
    models: int
    epochs: int
    why: str
