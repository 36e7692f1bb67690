"""``pcam-refit --best --top M``: the final models of the study's M best configurations,
averaged.

Each of the M best COMPLETE trials (distinct params, best mean CV AUC first) is refit as
``pcam-refit --trial T`` refits it (by default one model on every labelled patch for the
final model's epochs) into its own ``refit/trial-T/``; then an equal-weight ensemble of
their saved models (``refit/top/ensemble``, which ``pcam-predict`` loads) predicts the test
set -> ``refit/top/submission.csv``, ``refit/top/refit.json`` and the study's ``refit``
attr. With ``--time S`` each member is planned for an equal share of what is left, after
the blend's own test predictions.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

from data_pipeline.atomic import remove
from search.common.attrs import set_refit
from search.common.ensemble import load_ensemble, save_members
from search.common.pace import MARGIN, predict_seconds
from search.common.study import value_of
from search.submission.fold_models import search_oof
from search.submission.inputs import (
    RefitConfig,
    RefitError,
    RefitResult,
    Setup,
    check_outputs_writable,
    open_setup,
)
from search.submission.outputs import (
    OOF_CSV,
    REFIT_JSON,
    SUBMISSION,
    moved,
    predict_test,
    refuse_earlier,
    stage_dir,
    submission_frame,
    swap_in,
    write_csv_atomic,
)
from search.submission.plan import trial_pace
from search.submission.refit import refit
from search.training.metrics import auc, fold_aucs

TOP_DIR = "top"  # in studies/<study>/refit/: the averaged submission of --top


def top_trials(trials: list[FrozenTrial], m: int) -> list[FrozenTrial]:
    """The ``m`` best COMPLETE trials with distinct params (a re-run of the same params,
    e.g. a resumed one, counts once), best mean CV AUC first."""
    done = sorted(
        (t for t in trials if t.state == TrialState.COMPLETE), key=value_of, reverse=True
    )
    out: list[FrozenTrial] = []
    seen: set[str] = set()
    for t in done:
        key = json.dumps(t.params, sort_keys=True, default=str)
        if key not in seen and len(out) < m:
            seen.add(key)
            out.append(t)
    return out


def _search_estimate(su: Setup, members: list[FrozenTrial], out_dir: Path) -> dict:
    """The CV estimate of the blend: the AUC of the members' out-of-fold probabilities from
    the search, averaged (``oof.csv`` written), where the search kept them all; else the
    mean of the members' own CV AUCs."""
    y, folds = su.data.labels, su.folds
    oof = np.mean([search_oof(t, su.cache, len(y)) for t in members], axis=0)
    if not np.isfinite(oof).all():
        mean = float(np.mean([value_of(t) for t in members]))
        return {"oof_auc": mean, "oof_auc_folds": [], "oof_csv": None}
    df = pd.DataFrame({"id": su.data.ids, "label": y, "fold": folds, "prob": oof})
    csv = write_csv_atomic(df, out_dir / OOF_CSV, force=True)
    return {
        "oof_auc": auc(y, oof),
        "oof_auc_folds": fold_aucs(y, oof, folds, su.k),
        "oof_csv": csv,
    }


def member_seconds(total: float, elapsed: float, reserve: float, members_left: int) -> float:
    """The next member's ``--time``: an equal share of what is left of ``total`` seconds
    after ``elapsed`` and the blend's ``reserve`` (at least 1 s: it then reuses or trains
    what fits, as a refit with little time does)."""
    return max((total - elapsed - reserve) / members_left, 1.0)


def _blend_reserve(su: Setup, members: list[FrozenTrial], tta: int) -> float:
    """Seconds the blend's test predictions may take (each member again over every view)."""
    views = len(su.cache.rows("test")) * tta
    paces = [trial_pace(t) for t in members]
    return MARGIN * sum(predict_seconds(views, p) for p in paces if p is not None)


def refit_top(cfg: RefitConfig, m: int, console: Console) -> dict:
    """Refit the ``m`` best configurations, then write and record their average (see the
    module docstring); returns the record (``refit.json``)."""
    t_start = time.monotonic() if cfg.t_start is None else cfg.t_start
    check_outputs_writable(cfg)
    su = open_setup(cfg)
    members = top_trials(su.study.get_trials(deepcopy=False), m)
    if not members:
        raise RefitError(f"study {cfg.study!r} has no COMPLETE trial to refit yet")
    final_dir = (cfg.studies_dir / cfg.study / "refit" / TOP_DIR).resolve()
    sub_path = Path(cfg.out).resolve() if cfg.out else final_dir / SUBMISSION
    refuse_earlier([sub_path, final_dir / REFIT_JSON], cfg.force)  # before any work
    # each member's own refit folder is replaced only with --force too
    refuse_earlier(
        [final_dir.parent / f"trial-{t.number}" / REFIT_JSON for t in members], cfg.force
    )
    names = ", ".join(f"{t.number} ({value_of(t):.4f})" for t in members)
    console.print(f"the {len(members)} best configurations, trials (CV AUC): {names}")
    reserve = _blend_reserve(su, members, cfg.tta) if cfg.seconds is not None else 0.0
    results = []
    for i, t in enumerate(members):
        share = None
        if cfg.seconds is not None:
            elapsed = time.monotonic() - t_start
            share = member_seconds(cfg.seconds, elapsed, reserve, len(members) - i)
        now = time.monotonic()
        results.append(
            refit(replace(cfg, trial=t.number, out=None, seconds=share, t_start=now), console)
        )
    return _blend(cfg, su, members, results, final_dir, sub_path, t_start)


def _blend(
    cfg: RefitConfig,
    su: Setup,
    members: list[FrozenTrial],
    results: list[RefitResult],
    final_dir: Path,
    sub_path: Path,
    t_start: float,
) -> dict:
    """The equal-weight ensemble of the members' saved models, its test predictions and
    record, written into a stage folder that replaces ``refit/top/`` as a whole."""
    stage = stage_dir(final_dir)
    try:
        infos = [
            (r.ensemble_dir, 1.0 / len(results), {"label": f"trial {r.trial}", "trial": r.trial})
            for r in results
        ]
        meta = {
            "study": cfg.study,
            "dataset_fingerprint": su.cache.fingerprint,
            "layout": su.cache.meta.get("layout"),
            "folds_file": su.folds_file,
            "k": su.k,
        }
        ens_dir = save_members(stage / "ensemble", infos, meta)
        rows, probs = predict_test(load_ensemble(ens_dir, cfg.device), su.cache, cfg.tta, False)
        submission, test_auc = None, None
        if len(rows):
            path = sub_path if cfg.out else stage / SUBMISSION
            submission = write_csv_atomic(submission_frame(su.cache, probs, rows), path, True)
            y_test = su.cache.index["label"].to_numpy()[rows]
            test_auc = auc(y_test, probs) if (y_test >= 0).all() else None
        est = _search_estimate(su, members, stage)
        trials = [r.trial for r in results]
        record = {
            "kind": TOP_DIR,
            "path": TOP_DIR,
            "label": f"the {len(trials)} best configurations (trials "
            f"{', '.join(map(str, trials))}), averaged",
            "trials": trials,
            "members": [
                {
                    "trial": r.trial,
                    "search_auc": value_of(t),
                    "path": r.path,
                    "test_auc": r.test_auc,
                    "refit": str(Path(r.ensemble_dir).parent / REFIT_JSON),
                }
                for t, r in zip(members, results, strict=True)
            ],
            "tta": cfg.tta,
            # the search's CV of the members' fold models, blended (their own epochs): the
            # final models saw every labelled patch and hold nothing out
            "oof_auc": est["oof_auc"],
            "oof_auc_folds": est["oof_auc_folds"],
            "test_auc": test_auc,
            "dataset_fingerprint": su.cache.fingerprint,
            "layout": su.cache.meta.get("layout"),
            "ensemble": str(moved(ens_dir, stage, final_dir)),
            "oof_csv": str(moved(est["oof_csv"], stage, final_dir)) if est["oof_csv"] else None,
            "submission": str(moved(submission, stage, final_dir)) if submission else None,
            "seconds": round(time.monotonic() - t_start, 1),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        (stage / REFIT_JSON).write_text(json.dumps(record, indent=2))
        swap_in(stage, final_dir)
    except BaseException:  # Ctrl-C, a full disk: the earlier top refit stays as it was
        remove(stage)
        raise
    set_refit(su.study, json.loads(json.dumps(record)), final_dir / REFIT_JSON)
    return record
