"""``--budget``'s last step: the final model's plan from the search's pace, and the refit that
trains it and writes the submission in the time the search left."""

from __future__ import annotations

import time

import optuna
from optuna.trial import TrialState
from rich.console import Console

from data_pipeline.cli_common import EXIT_BAD_INPUT
from search.common import study as studies
from search.common.attrs import (
    FOLD_EPOCHS,
)
from search.common.cli_args import print_error
from search.common.config import SearchConfig
from search.tuning.deadline import (
    MARGIN,
    REFIT_FIXED_S,
    TIE_AUC,
    Deadline,
    Pace,
    final_epochs,
    full_fit_plan,
    pick_final,
)


def final_fold_epochs(cfg: SearchConfig) -> int:
    """Fold-epochs --budget reserves for the final model: what ``final_target_epochs`` of k
    fold models cost, whichever the fit. A full-data model gets k-1 times those epochs for it
    (CPU: 48, its cap), not a smaller reserve: at 5-10 minutes on 2 cores the final model's
    epochs, not more search, decide the test AUC (docs/benchmarks.md, "Model quality per
    unit of compute")."""
    return cfg.folds * cfg.final_target_epochs


def final_plan(
    cfg: SearchConfig, study: optuna.Study, t_cmd: float, deadline: Deadline, console: Console
) -> tuple[int | None, int, int]:
    """--budget: (trial, epochs, full-data models) of the final model: the best trial, or the
    fastest within ``TIE_AUC`` of it when that trains more epochs in what is left, trained
    for as many epochs as fit (on every labelled row, or on each fold: 0 full-data models);
    (None, 0, 0) = the best trial's own fold models. Said on the console."""
    assert cfg.budget is not None  # only --budget plans a final model
    best = deadline.best_pace()
    left = cfg.budget - (time.monotonic() - t_cmd)
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    paced = [
        (
            t.number,
            studies.value_of(t),
            (t.datetime_complete - t.datetime_start).total_seconds() / fe,
        )
        for t in done
        if (fe := t.user_attrs.get(FOLD_EPOCHS)) and t.datetime_complete and t.datetime_start
    ]
    if best is None or cfg.search_share >= 1 or not paced:
        return None, 0, 0
    top = max(paced, key=lambda t: t[1])

    def plan(trial: tuple) -> tuple[int, int, float]:
        """(full-data models, epochs, pace ratio to the best) of ``trial``'s final model."""
        ratio = trial[2] / top[2]  # its pace against the best trial's
        pace = Pace(best.seconds_per_fold_epoch * ratio, best.images_per_s / ratio)
        # the factor the reserve was sized with (Deadline.final_factor), defined once
        predict_s, cap, f = deadline.predict_s(pace), cfg.final_max_epochs, deadline.final_factor
        if cfg.final_fit == "full":
            seeds = cfg.final_seed_epochs
            return (*full_fit_plan(left, cfg.folds, pace, predict_s, cap, seeds, f), ratio)
        return 0, final_epochs(left, cfg.folds, pace, predict_s, cap, f), ratio

    chosen, (n, epochs, ratio) = top, plan(top)
    fast = next(t for t in paced if t[0] == pick_final(paced))
    if fast is not top:
        # a tie within fold noise goes to the faster trial only if its speed buys training:
        # once the best's plan is at the epoch cap, it buys nothing
        alt = plan(fast)
        if max(alt[0], 1) * alt[1] > max(n, 1) * epochs:
            chosen, (n, epochs, ratio) = fast, alt
    number = chosen[0]
    how = f"{cfg.folds} folds"
    if cfg.final_fit == "full":
        how = f"{n} model(s) on all labelled patches" if n > 1 else "all labelled patches"
    if epochs <= cfg.max_epochs:
        console.print(
            f"{left:.0f} s left: no more than the search's {cfg.max_epochs} epochs fit; "
            "submitting the best trial's own fold models"
        )
        return None, 0, 0
    why = (
        ""
        if number == top[0]
        else (f" (within {TIE_AUC} of the best, trial {top[0]}, and {1 / ratio:.1f}x as fast)")
    )
    console.print(
        f"{left:.0f} s left: training trial {number}'s params{why} again on {how} "
        f"for {epochs} epochs (the search's trials: {cfg.max_epochs})"
    )
    return number, epochs, n


def refit_in_budget(cfg: SearchConfig, console: Console, t_cmd: float, deadline: Deadline) -> int:
    """--budget: the final model (the best params for as many epochs as fit, or the best
    trial's own fold models) and its submission, in the time the search left."""
    from search.submission.inputs import RefitConfig, RefitError
    from search.submission.refit import refit
    from search.tuning import ray_adapter

    assert cfg.budget is not None  # only --budget refits in the same command
    ray_adapter.shutdown_ray()  # free the cores for the refit
    study = optuna.load_study(study_name=cfg.study, storage=studies.make_storage(cfg.storage_url))
    trial, epochs, full_models = final_plan(cfg, study, t_cmd, deadline, console)
    pace = deadline.best_pace()
    predict_s = deadline.predict_s(pace) * MARGIN if pace else 0.0
    rcfg = RefitConfig(
        trial=trial,
        epochs=epochs or None,
        retrain=epochs > 0 and not full_models,
        full_models=full_models,
        # the full-data models' training ends where the budget still fits the rest
        train_until=t_cmd + cfg.budget - predict_s - REFIT_FIXED_S,
        study=cfg.study,
        storage=cfg.storage,
        studies_dir=cfg.studies_dir,
        tta=cfg.tta,
        force=True,  # this run's own refit folder: a re-run of the same budget replaces it
        seed=cfg.seed,
        progress=cfg.progress,
    )
    try:
        res = refit(rcfg, console)
    except RefitError as e:
        print_error(console, str(e))
        return EXIT_BAD_INPUT
    total = time.monotonic() - t_cmd
    test = f", test AUC {res.test_auc:.4f}" if res.test_auc is not None else ""
    # a full-data model has no held-out part: its estimate is the search's k-fold CV. Pooled
    # (every row's held-out probability, one AUC) - not the trial's value, the mean of its
    # per-fold AUCs, which the refit line above prints
    est = "pooled OOF AUC of the search's fold models" if full_models else "pooled OOF AUC"
    console.print(
        f"refit trial {res.trial}: {est} {res.oof_auc:.4f}{test}; submission "
        f"{res.submission}; {total:.0f} s of the {cfg.budget:.0f} s budget"
    )
    return 0
