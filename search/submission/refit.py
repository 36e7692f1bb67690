"""Refit: the best COMPLETE trial's fold models as a TTA ensemble, and its submission.

``refit(cfg)``: study -> trial -> same data and folds as the search (the dataset fingerprint
must match) -> the fold models: by default the ones the search saved for this trial (no
training; their out-of-fold probabilities come with them), or with ``retrain`` (or when none
were kept) ``train_cv`` for the full epoch budget -> ``studies/<study>/refit/trial-<N>/``
(ensemble + oof.csv) -> test predictions (mean over fold models x dihedral views) ->
``submission.csv`` -> a ``refit`` record in the study's user attrs. No Ray: one process.

Its parts: ``inputs`` (config, trial, data), ``plan`` (the final model's epochs and models),
``fold_models`` (reused, retrained or full-data models), ``outputs`` (files, staged and
swapped in); this module runs them in that order.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from optuna.trial import FrozenTrial
from rich.console import Console

from data_pipeline.atomic import remove
from search.common import study as studies
from search.common.attrs import (
    AUC_FOLDS,
    set_refit,
)
from search.common.ensemble import (
    load_ensemble,
    model_meta,
)
from search.submission.fold_models import (
    FoldModels,
    retrain_folds,
    reuse_saved,
    saved_models,
    search_oof,
    train_full_models,
)
from search.submission.inputs import (
    RefitConfig,
    RefitResult,
    Setup,
    check_outputs_writable,
    open_setup,
    pick_trial,
    trial_params,
)
from search.submission.outputs import (
    OOF_CSV,
    REFIT_JSON,
    SUBMISSION,
    moved,
    pool_images,
    predict_test,
    refuse_earlier,
    stage_dir,
    submission_frame,
    swap_in,
    write_csv_atomic,
)
from search.submission.plan import final_config
from search.training.engine import (
    TrainParams,
)
from search.training.metrics import auc, fold_aucs
from search.tuning.ladder import epochs_of


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
    search_epochs = epochs_of(trial, int(su.search_cfg.get("max_epochs", 1)))
    epochs = cfg.epochs or search_epochs
    final_dir = (cfg.studies_dir / cfg.study / "refit" / f"trial-{trial.number}").resolve()
    # before any work: an earlier refit (its folder, or the submission asked for) is replaced
    # only with --force, and then as a whole
    sub_path = Path(cfg.out).resolve() if cfg.out else final_dir / SUBMISSION
    refuse_earlier([sub_path, final_dir / REFIT_JSON], cfg.force)  # before any work
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


def _models(cfg: RefitConfig, su: Setup, pl: _Plan, console: Console) -> FoldModels:
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
        oof = search_oof(pl.trial, su.cache, len(su.data.labels))
        fm = train_full_models(*args, pl.epochs, su.search_cfg, pl.out_dir, pl.meta, oof)
        if fm.epochs_trained and min(fm.epochs_trained) < pl.epochs:
            console.print(
                f"trained {fm.epochs_trained} of the planned {pl.epochs} epochs: at this pace "
                "the rest would have run past the budget (each schedule was shortened, so its "
                "lr still annealed)"
            )
        return fm
    if saved:
        return reuse_saved(saved, pl.out_dir, pl.trial.number)
    return retrain_folds(*args, su.folds, pl.epochs, su.k, su.search_cfg, pl.out_dir, pl.meta)


@dataclass
class _OOF:
    auc: float
    auc_folds: list[float]
    auc_best: float | None  # at each fold's best epoch (restore_best / patience)
    csv: Path | None


def _score_oof(su: Setup, pl: _Plan, fm: FoldModels) -> _OOF:
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


def _predict(cfg: RefitConfig, su: Setup, pl: _Plan, fm: FoldModels) -> _Test:
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


def _record(cfg: RefitConfig, su: Setup, pl: _Plan, fm: FoldModels, res: RefitResult) -> None:
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


def _path(fm: FoldModels) -> str:
    return "full" if fm.full else "retrain" if fm.trained else "reuse"


def refit(cfg: RefitConfig, console: Console) -> RefitResult:
    """Plan, get the models (reuse, retrain or full fit), score OOF, predict, record (see
    the module docstring)."""
    t0 = time.perf_counter()
    check_outputs_writable(cfg)
    su = open_setup(cfg)
    if cfg.final:
        cfg = final_config(cfg, su)
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
