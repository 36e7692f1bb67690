"""The final model's plan: how many epochs and full-data models the time allows, at the
trial's own pace (``plan_final``), and the refit config it turns into."""

from __future__ import annotations

import time
from dataclasses import replace

from optuna.trial import FrozenTrial

from search.common.attrs import (
    FOLD_EPOCHS,
    IMAGES_PER_S,
    SECONDS,
)
from search.common.defaults import CPU_DEFAULTS
from search.common.pace import MARGIN, REFIT_FIXED_S, Pace, full_fit_plan, predict_seconds
from search.submission.fold_models import saved_models
from search.submission.inputs import FinalPlan, RefitConfig, Setup, pick_trial
from search.tuning.ladder import epochs_of


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


def final_config(cfg: RefitConfig, su: Setup) -> RefitConfig:
    """``cfg`` with the final model's plan filled in (``cfg.final``); said on the console by
    ``_models``."""
    trial = pick_trial(su.study, cfg.trial)
    sc = su.search_cfg
    search_epochs = epochs_of(trial, int(sc.get("max_epochs", 1)))  # a promoted trial: its own
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
