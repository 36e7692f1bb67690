"""Refit: the best COMPLETE trial's fold models as a TTA ensemble, and its submission.

``refit(cfg)``: study -> trial -> same data and folds as the search (the dataset fingerprint
must match) -> the fold models: by default the ones the search saved for this trial (no
training; their out-of-fold probabilities come with them), or with ``retrain`` (or when none
were kept) ``train_cv`` for the full epoch budget -> ``studies/<study>/refit/trial-<N>/``
(ensemble + oof.csv) -> test predictions (mean over fold models x dihedral views) ->
``submission.csv`` -> a ``refit`` record in the study's user attrs. No Ray: one process.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import overload

import numpy as np
import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from data_pipeline.atomic import atomic_path, remove, temp_beside
from data_pipeline.cache import Cache, pid_alive
from data_pipeline.dataset import DataConfig, open_dataset
from data_pipeline.folds import folds_file, folds_for_cache
from data_pipeline.kaggle import SUBMISSION_CSV
from data_pipeline.synth import SynthConfig
from search.common import study as studies
from search.common.attrs import (
    AUC_FOLDS,
    CONFIG,
    DATASET_FINGERPRINT,
    FOLD_EPOCHS,
    IMAGES_PER_S,
    MODELS_DIR,
    SECONDS,
    SPACE,
    get_record,
    set_refit,
)
from search.common.config import weights_arg
from search.common.defaults import CPU_DEFAULTS
from search.common.ensemble import (
    META_FILE,
    Ensemble,
    WeightedEnsemble,
    load_ensemble,
    load_oof,
    model_meta,
    save_ensemble,
)
from search.common.pace import MARGIN, REFIT_FIXED_S, Pace, full_fit_plan, predict_seconds
from search.training.engine import (
    PoolImages,
    TrainData,
    TrainParams,
    train_cv,
    train_full,
)
from search.training.metrics import auc, fold_aucs

# the files of a refit folder (studies/<study>/refit/<trial-N or ensemble>/)
SUBMISSION = "submission.csv"
OOF_CSV = "oof.csv"
REFIT_JSON = "refit.json"


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


def submission_frame(cache: Cache, probs: np.ndarray, test_rows: np.ndarray) -> pd.DataFrame:
    """``id,label`` rows in ``sample_submission.csv``'s order (Kaggle layout) or the cache's
    test order (PCam). Ids that differ from the sample submission are a ``RefitError``
    naming them: never a partial or reordered file."""
    ids = cache.index["id"].to_numpy()[test_rows]
    pred = pd.Series(probs, index=ids)
    sample = Path(cache.meta["source"]) / SUBMISSION_CSV
    if cache.meta.get("layout") != "kaggle":
        return pd.DataFrame({"id": ids, "label": probs})
    if not sample.is_file():
        raise RefitError(f"{sample}: missing; it gives the ids and order of a submission")
    want = pd.read_csv(sample, dtype={"id": str})["id"]
    missing = sorted(set(want) - set(ids))
    extra = sorted(set(ids) - set(want))
    if missing or extra:
        raise RefitError(
            f"test images and {sample} disagree: {len(missing)} ids have no image "
            f"(first: {missing[:5]}), {len(extra)} images are not in it (first: {extra[:5]}); "
            "no submission written"
        )
    return pd.DataFrame({"id": want.to_numpy(), "label": pred.loc[want].to_numpy()})


def check_out_path(path: Path, force: bool) -> None:
    """Before any work: ``path`` can take a CSV (not a folder, not an existing file without
    ``force``, in a folder that can be written); a ``RefitError`` or ``StorageError`` naming
    it otherwise."""
    path = Path(path)
    if path.is_dir():
        raise RefitError(f"--out {path} is a folder; give a file name, e.g. {path / SUBMISSION}")
    if path.exists() and not force:
        raise RefitError(f"{path} exists; pass --force to overwrite it")
    studies.check_writable(path.resolve().parent, "the submission")


def write_csv_atomic(df: pd.DataFrame, path: Path, force: bool) -> Path:
    """Write ``df`` to ``path`` via a temp file + rename; refuse to overwrite without force."""
    path = Path(path)
    if path.exists() and not force:
        raise RefitError(f"{path} exists; pass --force to overwrite it")
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return path


def pool_images(cache: Cache, rows: np.ndarray) -> PoolImages:
    """The cache's patches at ``rows``, memory-mapped (prediction reads them batch by batch)."""
    return PoolImages(Path(cache.path) / "images.npy", rows)


def progress_bar(label: str, enabled: bool) -> Progress:
    """A refit's bar on stderr: label, bar, done/total, elapsed (off with --no-progress)."""
    return Progress(
        TextColumn(label),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        disable=not enabled,
        console=Console(stderr=True),
    )


def predict_test(
    ens: Ensemble | WeightedEnsemble, cache: Cache, tta: int, progress: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(test rows, mean TTA probabilities) for the cache's test split."""
    rows = cache.rows("test")
    if len(rows) == 0:
        return rows, np.zeros(0, np.float32)
    with progress_bar("predict test", progress) as bar:
        task = bar.add_task("test", total=len(rows))
        probs = ens.predict(
            pool_images(cache, rows), tta=tta, progress=lambda n: bar.advance(task, n)
        )
    return rows, probs


@dataclass
class _FoldModels:
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


def _reuse(saved: Path, out_dir: Path, trial: int) -> _FoldModels:
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
    return _FoldModels(dest, oof, oof, None, None, trained=False)


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


def _retrain(
    cfg: RefitConfig,
    params: dict,
    data: TrainData,
    folds: np.ndarray,
    epochs: int,
    k: int,
    search_cfg: dict,
    out_dir: Path,
    meta: dict,
) -> _FoldModels:
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
    return _FoldModels(ens_dir, saved, res.oof, oof_best, res.best_epochs, trained=True)


def _full_fit(
    cfg: RefitConfig,
    params: dict,
    data: TrainData,
    epochs: int,
    search_cfg: dict,
    out_dir: Path,
    meta: dict,
    oof: np.ndarray,
) -> _FoldModels:
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
    return _FoldModels(ens_dir, oof, oof, None, None, True, full=True, epochs_trained=trained)


def _search_oof(trial: FrozenTrial, cache: Cache, n: int) -> np.ndarray:
    """The trial's kept fold models' out-of-fold probabilities, or NaN (not kept)."""
    saved = saved_models(trial, cache, 0, 0)  # None when not kept (or for other data)
    oof = load_oof(saved) if saved else None
    return oof if oof is not None and len(oof) == n else np.full(n, np.nan, np.float32)


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


def trial_pace(trial: FrozenTrial) -> Pace | None:
    """How fast ``trial`` trained in the search (its seconds per fold-epoch and img/s)."""
    sec, fe = trial.user_attrs.get(SECONDS), trial.user_attrs.get(FOLD_EPOCHS)
    ips = trial.user_attrs.get(IMAGES_PER_S)
    if not sec or not fe or not ips:
        return None
    return Pace(float(sec) / float(fe), float(ips))


def plan_final(
    k: int,
    search_epochs: int,
    cap: int,
    seed_epochs: int,
    pace: Pace | None,
    seconds: float | None,
    predict_images: int,
    has_saved: bool,
) -> FinalPlan:
    """The final model of ``pcam-refit``'s default. At equal compute one model on every
    labelled row for the final model's epochs beats the search's k fold models (docs/benchmarks.md,
    "The final model"), so that is the plan: ``cap`` epochs with no time limit; with ``seconds``,
    the seeds and epochs that fit at the trial's ``pace`` (``full_fit_plan``, as
    ``--budget``'s final step). Where no more than the search's epochs fit and the search
    kept the trial's fold models, those are submitted instead (no training)."""
    full_rows = f"all labelled patches (the search's trials trained {search_epochs} epochs)"
    if seconds is None:
        why = f"no --time: one model on {full_rows} for {cap} epochs, the final model's cap"
        return FinalPlan("full", 1, cap, why)
    if pace is None:
        why = (
            f"the trial's pace is unknown: one model on {full_rows}, ending within {seconds:.0f} s"
        )
        return FinalPlan("full", 1, cap, why)
    predict_s = predict_seconds(predict_images, pace)
    n, epochs = full_fit_plan(seconds, k, pace, predict_s, cap, seed_epochs)
    if epochs <= search_epochs and has_saved:
        why = (
            f"in {seconds:.0f} s no more than the search's {search_epochs} epochs fit: its own "
            "fold models, no training"
        )
        return FinalPlan("reuse", 0, 0, why)
    epochs = max(epochs, 1)
    what = f"{n} models (seeds)" if n > 1 else "one model"
    why = f"{what} on {full_rows} for {epochs} epochs: what fits {seconds:.0f} s at its pace"
    return FinalPlan("full", n, epochs, why)


def _final_config(cfg: RefitConfig, su: Setup) -> RefitConfig:
    """``cfg`` with the final model's plan filled in (``cfg.final``); said on the console by
    ``_models``."""
    trial = pick_trial(su.study, cfg.trial)
    sc = su.search_cfg
    search_epochs = int(sc.get("max_epochs", 1))
    cap = int(sc.get("final_max_epochs") or CPU_DEFAULTS.final_max_epochs)
    seed_epochs = int(sc.get("final_seed_epochs") or cap)
    t0 = time.monotonic() if cfg.t_start is None else cfg.t_start
    left = None if cfg.seconds is None else cfg.seconds - (time.monotonic() - t0)
    views = len(su.cache.rows("test")) * cfg.tta
    pace = trial_pace(trial)
    saved = saved_models(trial, su.cache, search_epochs, search_epochs) is not None
    plan = plan_final(su.k, search_epochs, cap, seed_epochs, pace, left, views, saved)
    if cfg.epochs:  # --epochs: the full-data model's length, as asked
        plan = FinalPlan("full", max(plan.models, 1), cfg.epochs, f"--epochs {cfg.epochs}")
    until = None
    if cfg.seconds is not None and plan.path == "full":
        predict_s = predict_seconds(views, pace) * MARGIN if pace else 0.0
        until = t0 + cfg.seconds - predict_s - REFIT_FIXED_S
    return replace(
        cfg,
        final_plan=plan,
        full_models=plan.models if plan.path == "full" else 0,
        epochs=plan.epochs if plan.path == "full" else None,
        train_until=until,
    )


@dataclass
class _Plan:
    """Step 1 of a refit: which trial, with what params and epochs, written where."""

    trial: FrozenTrial
    params: dict
    epochs: int
    search_epochs: int
    out_dir: Path  # where this refit writes: a stage folder beside ``final_dir``
    sub_path: Path
    meta: dict  # saved with the ensemble
    final_dir: Path  # the trial's refit folder, replaced by ``out_dir`` as a whole at the end


def _plan(cfg: RefitConfig, su: Setup) -> _Plan:
    """Pick the trial and its output paths; refuse an existing submission before any work."""
    trial = pick_trial(su.study, cfg.trial)
    params = trial_params(su.study, trial)
    search_epochs = int(su.search_cfg.get("max_epochs", 1))
    epochs = cfg.epochs or search_epochs
    final_dir = (cfg.studies_dir / cfg.study / "refit" / f"trial-{trial.number}").resolve()
    # before any work: an earlier refit (its folder, or the submission asked for) is replaced
    # only with --force, and then as a whole
    sub_path = Path(cfg.out).resolve() if cfg.out else final_dir / SUBMISSION
    for earlier in (sub_path, final_dir / REFIT_JSON):
        if earlier.exists() and not cfg.force:
            raise RefitError(f"{earlier} exists (an earlier refit); pass --force to replace it")
    out_dir = stage_dir(final_dir)
    if not cfg.out:
        sub_path = out_dir / SUBMISSION
    meta = {
        "study": cfg.study,
        "trial": trial.number,
        **model_meta(TrainParams.from_dict(params)),
        "epochs": epochs,
        "k": su.k,
        "folds_file": su.folds_file,
        "dataset_fingerprint": su.cache.fingerprint,
    }
    return _Plan(trial, params, epochs, search_epochs, out_dir, sub_path, meta, final_dir)


def _models(cfg: RefitConfig, su: Setup, pl: _Plan, console: Console) -> _FoldModels:
    """Step 2: the models to submit: full-data models trained now, the search's own fold
    models (no training), or fold models trained again; saved under the refit folder."""
    full = cfg.full_models > 0
    saved = None
    if not (cfg.retrain or full):
        saved = saved_models(pl.trial, su.cache, pl.epochs, pl.search_epochs)
    how = (
        f"{cfg.full_models} model(s) trained on all {len(su.data.labels)} labelled patches x "
        f"{pl.epochs} epochs (CV estimate: the search's {su.k} folds)"
        if full
        else "its own fold models from the search, no training"
        if saved
        else f"retrained: {su.k} folds x {pl.epochs} epochs"
        + ("" if cfg.retrain else " (the search kept no fold models for it)")
    )
    console.print(
        f"refit trial {pl.trial.number} of study {cfg.study!r} (its search value, the mean "
        f"of its folds' AUCs, {pl.trial.value:.4f}): {how}, TTA x{cfg.tta}"
    )
    if cfg.final_plan is not None:
        console.print(f"why: {cfg.final_plan.why}", highlight=False)
    args = (cfg, pl.params, su.data)
    if full:
        oof = _search_oof(pl.trial, su.cache, len(su.data.labels))
        fm = _full_fit(*args, pl.epochs, su.search_cfg, pl.out_dir, pl.meta, oof)
        if fm.epochs_trained and min(fm.epochs_trained) < pl.epochs:
            console.print(
                f"trained {fm.epochs_trained} of the planned {pl.epochs} epochs: at this pace "
                "the rest would have run past the budget (each schedule was shortened, so its "
                "lr still annealed)"
            )
        return fm
    if saved:
        return _reuse(saved, pl.out_dir, pl.trial.number)
    return _retrain(*args, su.folds, pl.epochs, su.k, su.search_cfg, pl.out_dir, pl.meta)


@dataclass
class _OOF:
    auc: float
    auc_folds: list[float]
    auc_best: float | None  # at each fold's best epoch (restore_best / patience)
    csv: Path | None


def _score_oof(su: Setup, pl: _Plan, fm: _FoldModels) -> _OOF:
    """Step 3: out-of-fold AUC of the models (the search's CV for full-data models, which
    hold nothing out) and ``oof.csv`` beside them."""
    y, folds, k = su.data.labels, su.folds, su.k
    oof = fm.oof_final
    if np.isnan(oof).all():  # full-data models whose trial kept no fold models
        auc_all = studies.value_of(pl.trial)
        auc_folds = [float(a) for a in pl.trial.user_attrs.get(AUC_FOLDS, [])]
    else:
        auc_all = auc(y, oof)
        auc_folds = fold_aucs(y, oof, folds, k)
    # With early stopping / restore_best the kept weights are each fold's best epoch, chosen on
    # that same held-out fold: an optimistic OOF. Report it beside the final-epoch OOF.
    best = auc(y, fm.oof_best) if fm.oof_best is not None else None
    csv = None
    if np.isfinite(fm.oof).all():  # full-data models of an unkept trial: no OOF to write
        df = pd.DataFrame({"id": su.data.ids, "label": y, "fold": folds, "prob": fm.oof})
        csv = write_csv_atomic(df, pl.out_dir / OOF_CSV, force=True)
    return _OOF(auc_all, auc_folds, best, csv)


@dataclass
class _Test:
    submission: Path | None = None
    auc: float | None = None
    auc_folds: list[float] | None = None  # each saved model alone, one view
    gap: float | None = None  # validation - test of the same models (fold models only)
    seconds: float = 0.0


def _predict(cfg: RefitConfig, su: Setup, pl: _Plan, fm: _FoldModels) -> _Test:
    """Step 4: the saved ensemble (loaded as pcam-predict loads it) on the test set with TTA
    -> ``submission.csv``; with test labels, its AUC and the like-for-like gap."""
    t0 = time.perf_counter()
    ens = load_ensemble(fm.ens_dir, cfg.device)  # what pcam-predict loads: test the saved files
    rows, probs = predict_test(ens, su.cache, cfg.tta, cfg.progress)
    out = _Test()
    if len(rows):
        sub = submission_frame(su.cache, probs, rows)
        out.submission = write_csv_atomic(sub, pl.sub_path, cfg.force)
        y_test = su.cache.index["label"].to_numpy()[rows]
        if (y_test >= 0).all():
            out.auc = auc(y_test, probs)
            # The ensemble + TTA score is not comparable with OOF, which is one model on one
            # view: score each fold model alone, untransformed, for the like-for-like gap.
            single = ens.predict(pool_images(su.cache, rows), tta=1, per_model=True)
            out.auc_folds = [auc(y_test, pm) for pm in single]
            if not fm.full:  # full-data models have no held-out part to compare with
                y, folds = su.data.labels, su.folds
                held = fold_aucs(y, fm.oof, folds, su.k)
                out.gap = float(np.mean(held) - np.mean(out.auc_folds))
    out.seconds = time.perf_counter() - t0
    return out


def _record(cfg: RefitConfig, su: Setup, pl: _Plan, fm: _FoldModels, res: RefitResult) -> None:
    """Step 5: ``refit.json`` beside the models; the stage folder replaces the trial's refit
    folder as a whole (models, OOF, submission and record change together or not at all);
    then the study's ``refit`` attr."""
    record = {
        "trial": res.trial,
        "epochs": pl.epochs,
        "tta": cfg.tta,
        "oof_auc": res.oof_auc,
        "oof_auc_folds": res.oof_auc_folds,
        "oof_auc_best_epochs": res.oof_auc_best,
        "best_epochs": fm.best_epochs,
        "trained": fm.trained,
        # which models were submitted: "full" (trained on every labelled row), "reuse" (the
        # search's own fold models) or "retrain" (fold models trained again)
        "path": res.path,
        "plan": cfg.final_plan.why if cfg.final_plan else None,
        # full-data models: oof_auc is the search's k-fold estimate of these params (at its
        # epochs), not of these models, which saw every labelled patch
        "full_fit": cfg.full_models if fm.full else 0,
        "epochs_trained": fm.epochs_trained,  # full-data models: fewer than planned = cut
        "test_auc": res.test_auc,
        "test_auc_folds": res.test_auc_folds,
        "validation_minus_test": res.validation_gap,
        "search_auc": pl.trial.value,
        "dataset_fingerprint": su.cache.fingerprint,
        "other_data": su.other_data,
        "layout": res.layout,
        "ensemble": str(res.ensemble_dir),
        "oof_csv": str(res.oof_csv) if res.oof_csv else None,
        "submission": str(res.submission) if res.submission else None,
        "seconds": res.seconds,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (pl.out_dir / REFIT_JSON).write_text(json.dumps(record, indent=2))
    swap_in(pl.out_dir, pl.final_dir)
    set_refit(su.study, json.loads(json.dumps(record)), pl.final_dir / REFIT_JSON)


def stage_dir(final_dir: Path) -> Path:
    """A new, empty folder beside ``final_dir`` to write a refit's outputs into (stages that
    a killed refit left behind are removed first)."""
    for old in final_dir.parent.glob(f".{final_dir.name}.new*"):
        pid = old.name.rsplit(".new", 1)[-1]
        if not pid.isdigit() or not pid_alive(int(pid)):
            remove(old)
    stage = temp_beside(final_dir, "new")
    remove(stage)
    stage.mkdir(parents=True)
    return stage


def swap_in(stage: Path, final_dir: Path) -> None:
    """Put the whole ``stage`` folder in place of ``final_dir`` (two renames; the old one is
    removed only after)."""
    with atomic_path(final_dir) as tmp:
        os.replace(stage, tmp)


@overload
def moved(path: Path, stage: Path, final_dir: Path) -> Path: ...
@overload
def moved(path: None, stage: Path, final_dir: Path) -> None: ...
def moved(path: Path | None, stage: Path, final_dir: Path) -> Path | None:
    """``path`` as it is after ``swap_in``: inside ``final_dir`` if it was in ``stage``."""
    if path is None or not Path(path).is_relative_to(stage):
        return path
    return final_dir / Path(path).relative_to(stage)


def _path(fm: _FoldModels) -> str:
    return "full" if fm.full else "retrain" if fm.trained else "reuse"


def refit(cfg: RefitConfig, console: Console) -> RefitResult:
    """Plan, get the models (reuse, retrain or full fit), score OOF, predict, record (see
    the module docstring)."""
    t0 = time.perf_counter()
    check_outputs_writable(cfg)
    su = open_setup(cfg)
    if cfg.final:
        cfg = _final_config(cfg, su)
    pl = _plan(cfg, su)
    try:
        result = _run(cfg, su, pl, console, t0)
    except BaseException:  # Ctrl-C, a full disk, ...: the earlier refit stays as it was
        remove(pl.out_dir)
        raise
    return result


def _run(cfg: RefitConfig, su: Setup, pl: _Plan, console: Console, t0: float) -> RefitResult:
    """``refit``'s steps 2-5, writing into the plan's stage folder."""
    fm = _models(cfg, su, pl, console)
    t_train = time.perf_counter() - t0
    oof = _score_oof(su, pl, fm)
    test = _predict(cfg, su, pl, fm)
    in_final = lambda p: moved(p, pl.out_dir, pl.final_dir)  # noqa: E731  (the paths after the swap)
    result = RefitResult(
        trial=pl.trial.number,
        params=pl.params,
        oof_auc=oof.auc,
        oof_auc_folds=oof.auc_folds,
        oof_auc_best=oof.auc_best,
        best_epochs=fm.best_epochs,
        test_auc=test.auc,
        test_auc_folds=test.auc_folds,
        validation_gap=test.gap,
        ensemble_dir=moved(fm.ens_dir, pl.out_dir, pl.final_dir),
        oof_csv=in_final(oof.csv),
        submission=in_final(test.submission),
        seconds={"train": round(t_train, 1), "predict": round(test.seconds, 1)},
        layout=su.cache.meta.get("layout"),
        path=_path(fm),
    )
    _record(cfg, su, pl, fm, result)
    return result
