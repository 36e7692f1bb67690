"""``pcam-refit`` and ``pcam-predict``.

pcam-refit --best                    # best COMPLETE trial of study "pcam": its params trained
                                     # on every labelled patch for the final model's epochs
pcam-refit --best --time 600         # the same, ending within 10 minutes (seeds if they fit)
pcam-refit --best --reuse            # its own fold models from the search: no training
pcam-refit --best --retrain          # the same params, fold models trained again
pcam-refit --trial 17 --epochs 20    # a chosen COMPLETE trial, one full-data model x 20 epochs
pcam-refit --best --top 3            # the 3 best configurations refit so, their models averaged
pcam-refit --ensemble 10             # greedy ensemble selection over the 10 best kept trials
pcam-predict DIR --ensemble studies/pcam/refit/trial-17/ensemble --out preds.csv
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import optuna
from rich.console import Console

import models
from data_pipeline.cli_common import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    add_cache_dir,
    add_no_progress,
)
from data_pipeline.dataset import DataConfig, open_dataset
from data_pipeline.problems import DataError
from data_pipeline.version import add_version, help_text
from search.common import study as studies
from search.common.cli_args import add_study_args, print_error, study_flags
from search.common.config import DEFAULT_TTA
from search.common.ensemble import TTA_CHOICES, EnsembleError, load_ensemble
from search.submission.inputs import RefitConfig, RefitError, RefitResult
from search.submission.outputs import (
    REFIT_JSON,
    check_out_path,
    predict_test,
    submission_frame,
    write_csv_atomic,
)
from search.submission.refit import refit
from search.submission.refit_ensemble import refit_ensemble
from search.submission.refit_top import refit_top

KAGGLE_COMPETITION = "histopathologic-cancer-detection"


def refit_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pcam-refit",
        description=help_text(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version(ap)
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--best", action="store_true", help="refit the best COMPLETE trial")
    which.add_argument("--trial", type=int, help="refit this COMPLETE trial number")
    which.add_argument(
        "--ensemble",
        type=int,
        metavar="N",
        help="greedy ensemble selection (with replacement, on out-of-fold AUC) over the fold "
        "models the search kept for its N best trials, plus any retrained final model; no "
        "training. Writes studies/<study>/refit/ensemble/",
    )
    ap.add_argument(
        "--top",
        type=int,
        default=1,
        metavar="M",
        help="with --best: refit each of the M best configurations (distinct params) as "
        "--trial refits it, and submit their models averaged (studies/<study>/refit/top/); "
        "with --time each gets an equal share (default: %(default)s)",
    )
    add_study_args(ap)
    ap.add_argument(
        "--data",
        type=Path,
        default=None,
        help="data folder (default: the data the study was searched on)",
    )
    add_cache_dir(ap)
    ap.add_argument(
        "--other-data",
        action="store_true",
        help="refit on data whose content differs from what the study searched (refused "
        "otherwise; recorded in refit.json)",
    )
    how = ap.add_mutually_exclusive_group()
    how.add_argument(
        "--reuse",
        action="store_true",
        help="submit the trial's own fold models from the search: no training, instant "
        "(default: the params trained on every labelled patch for the final model's epochs, "
        "which beats the fold models at equal compute)",
    )
    how.add_argument(
        "--retrain",
        action="store_true",
        help="train the trial's k fold models again (for --epochs)",
    )
    ap.add_argument(
        "--time",
        type=float,
        default=None,
        metavar="S",
        help="the refit ends within S seconds: the final model's epochs (and seeds) are "
        "planned for them at the trial's pace, and its training stops in time",
    )
    ap.add_argument(
        "--full",
        type=int,
        nargs="?",
        const=1,
        default=0,
        metavar="N",
        help="instead of k fold models, train N models (seeds; default 1) on every labelled "
        "patch for --epochs: more data per model and k/(k-1)x fewer passes per epoch; the CV "
        "estimate is then the search's own (its fold models of the same params)",
    )
    ap.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs per model when training (default: the final model's cap for a "
        "full-data model, the search's --max-epochs for --retrain)",
    )
    ap.add_argument(
        "--tta",
        type=int,
        choices=TTA_CHOICES,
        default=8,
        help="dihedral test-time views per patch (default: %(default)s)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="submission path (default: studies/<study>/refit/trial-N/submission.csv)",
    )
    _add_force_device(ap)
    ap.add_argument(
        "--seed", type=int, default=0, help="training seed of retrained models (default: 0)"
    )
    add_no_progress(ap)
    ap.add_argument(
        "--json",
        action="store_true",
        help="print the refit's record (refit.json) as one JSON line on stdout at the end; "
        "the rest goes to stderr",
    )
    return ap


def _add_force_device(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--force", action="store_true", help="overwrite an existing submission")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")


def refit_main(argv: list[str] | None = None) -> int:
    """The ``pcam-refit`` entry point: check the flags, refit (or select an ensemble), print
    what was written; the exit code."""
    t_start = time.monotonic()  # --time counts from here
    args = refit_parser().parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    err, out = Console(stderr=True, soft_wrap=True), Console(soft_wrap=True)
    problem = _flag_problem(args)
    if problem:
        return print_error(err, problem)
    cfg = _refit_config(args, t_start)
    if args.json:  # stdout holds the one JSON record; everything else goes to stderr
        out = Console(soft_wrap=True, stderr=True)
    try:
        if args.ensemble is not None:
            rec = refit_ensemble(cfg, args.ensemble, out).record
            rc = _print_ensemble(rec, cfg, out)
            if args.json:
                print(json.dumps(rec, default=str))
            return rc
        if args.top > 1:
            rec = refit_top(cfg, args.top, out)
            out.print(_top_line(rec), highlight=False)
            rc = _print_outputs(cfg, rec["submission"], rec.get("layout"), out)
            if args.json:
                print(json.dumps(rec, default=str))
            return rc
        r = refit(cfg, out)
    except KeyboardInterrupt:
        err.print("interrupted: the earlier refit is unchanged", highlight=False)
        return EXIT_INTERRUPTED
    except (
        RefitError,
        EnsembleError,
        DataError,
        studies.StorageError,
        models.MissingWeightsError,
        ValueError,
    ) as e:
        print_error(err, str(e))
        return EXIT_BAD_INPUT
    _print_scores(r, out)
    rc = _print_outputs(cfg, r.submission, r.layout, out)
    if args.json:
        print(json.dumps(json.loads((Path(r.ensemble_dir).parent / REFIT_JSON).read_text())))
    return rc


def _flag_problem(args: argparse.Namespace) -> str:
    """Why the flags do not go together ("" when they do)."""
    try:
        studies.check_study_name(args.study)
    except ValueError as e:
        return str(e)
    if args.full < 0 or (args.full and args.retrain):
        return "--full N needs N >= 1 (it trains; no --retrain)"
    if args.reuse and args.epochs:
        return "--reuse trains nothing (no --epochs)"
    if args.top < 1 or (args.top > 1 and not args.best):
        return f"--top M needs M >= 1 and --best (got --top {args.top})"
    if args.time is not None and args.time <= 0:
        return f"--time must be > 0 seconds, got {args.time}"
    if args.ensemble is not None and (
        args.ensemble < 1 or args.retrain or args.epochs or args.full or args.reuse
    ):
        return "--ensemble N needs N >= 1 and trains nothing (no --retrain, --epochs or --full)"
    return ""


def _refit_config(args: argparse.Namespace, t_start: float) -> RefitConfig:
    return RefitConfig(
        study=args.study,
        storage=args.storage,
        studies_dir=args.studies_dir,
        trial=None if args.best else args.trial,
        epochs=args.epochs,
        tta=args.tta,
        data=args.data,
        cache_dir=args.cache_dir,
        out=args.out,
        force=args.force,
        retrain=args.retrain,
        full_models=args.full,
        # the default: plan the final model (full-data fit, or reuse when nothing more fits)
        final=not (args.reuse or args.retrain or args.full),
        seconds=args.time,
        t_start=t_start,
        other_data=args.other_data,
        device=args.device,
        seed=args.seed,
        progress=not args.no_progress and sys.stderr.isatty(),
    )


def _print_scores(r: RefitResult, out: Console) -> None:
    """The refit's validation (and, with test labels, test) AUCs, and where it wrote."""
    folds = ", ".join(f"{a:.4f}" for a in r.oof_auc_folds)
    full = r.path == "full"
    what = "CV AUC of these params, the search's fold models" if full else "OOF AUC"
    out.print(f"{what} {r.oof_auc:.4f} (folds {folds})", highlight=False)
    if r.test_auc is not None:
        n = len(r.test_auc_folds or r.oof_auc_folds)
        out.print(
            f"test AUC {r.test_auc:.4f} (ensemble of {n}, TTA; true test labels present)",
            highlight=False,
        )
    if r.test_auc_folds is not None and r.validation_gap is None:
        tf = ", ".join(f"{a:.4f}" for a in r.test_auc_folds)
        out.print(f"test AUC of each full-data model alone, 1 view: {tf}", highlight=False)
    elif r.test_auc_folds is not None:
        # like for like: fold model f on its held-out fold vs the same model on the test set
        tf = ", ".join(f"{a:.4f}" for a in r.test_auc_folds)
        out.print(
            f"test AUC of each fold model alone, 1 view: {tf}\n"
            f"validation - test = {r.validation_gap:+.4f} (mean per-fold OOF minus mean "
            f"single-model test AUC; > 0: validation flatters the models)",
            highlight=False,
        )
    out.print(f"ensemble: {r.ensemble_dir}\nout-of-fold: {r.oof_csv}", highlight=False)


def _top_line(rec: dict) -> str:
    """What --top submitted: the members and, with test labels, each one's and the blend's AUC."""
    members = ", ".join(
        f"trial {m['trial']} (CV {m['search_auc']:.4f}"
        + (f", test {m['test_auc']:.4f})" if m.get("test_auc") is not None else ")")
        for m in rec["members"]
    )
    line = f"averaged: {members}; CV AUC of their search fold models blended {rec['oof_auc']:.4f}"
    if rec.get("test_auc") is not None:
        line += f"; test AUC {rec['test_auc']:.4f} (true test labels present)"
    return line + f"\nensemble: {rec['ensemble']}"


def _print_ensemble(rec: dict, cfg: RefitConfig, out: Console) -> int:
    if rec["test_auc"] is not None:
        members = ", ".join(f"{m['label']} {m['test_auc']:.4f}" for m in rec["members"])
        out.print(
            f"test AUC {rec['test_auc']:.4f} (true test labels present; nested estimate "
            f"{rec['nested_auc']:.4f}); each member alone: {members}",
            highlight=False,
        )
    if rec["validation_minus_test"] is not None:
        out.print(
            f"validation - test = {rec['validation_minus_test']:+.4f} (fold model f of every "
            f"member blended, on its held-out fold vs on the test set, {rec['oof_views']} "
            "view(s))",
            highlight=False,
        )
    out.print(f"ensemble: {rec['ensemble']}\nout-of-fold: {rec['oof_csv']}", highlight=False)
    return _print_outputs(cfg, rec["submission"], rec.get("layout"), out)


def _print_outputs(
    cfg: RefitConfig, submission: Path | None, layout: str | None, out: Console
) -> int:
    """The submission and what to run next: the report, and Kaggle's submit command."""
    if not submission:
        out.print("no test split in the data: no submission written")
        return 0
    out.print(f"submission: {submission}", highlight=False)
    where = study_flags(cfg.study, cfg.studies_dir, cfg.storage)
    out.print("next:", highlight=False)
    out.print(f"  {shlex.join(['pcam-report', *where])}", highlight=False, markup=False)
    if layout == "kaggle":
        kaggle = ["kaggle", "competitions", "submit", "-c", KAGGLE_COMPETITION]
        kaggle += ["-f", str(submission), "-m", f"pcam-search study {cfg.study}"]
        out.print(f"  {shlex.join(kaggle)}", highlight=False, markup=False)
    return 0


def predict_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pcam-predict",
        description="score the test split of a folder with a saved ensemble; writes id,label",
    )
    add_version(ap)
    ap.add_argument(
        "data",
        type=Path,
        help="Kaggle or PCam folder whose test split to predict (required: a submission is "
        "for the data you name, never the embedded demo set by default)",
    )
    ap.add_argument(
        "--ensemble",
        type=Path,
        required=True,
        help="an ensemble folder (one trial's fold models, or pcam-refit --ensemble's)",
    )
    ap.add_argument("--out", type=Path, required=True, help="CSV to write (id,label)")
    ap.add_argument(
        "--tta",
        type=int,
        choices=TTA_CHOICES,
        default=DEFAULT_TTA,
        help="dihedral test-time views per patch (default: %(default)s)",
    )
    add_cache_dir(ap)
    _add_force_device(ap)
    return ap


def predict_main(argv: list[str] | None = None) -> int:
    args = predict_parser().parse_args(argv)
    err, out = Console(stderr=True, soft_wrap=True), Console(soft_wrap=True)
    try:
        check_out_path(args.out, args.force)  # before any work
        ens = load_ensemble(args.ensemble, args.device)
        cache = open_dataset(
            DataConfig(data=args.data, cache_dir=args.cache_dir), progress=sys.stderr.isatty()
        )
        rows, probs = predict_test(ens, cache, args.tta, sys.stderr.isatty())
        if len(rows) == 0:
            raise RefitError(f"{cache.meta['source']}: no test split to predict")
        path = write_csv_atomic(submission_frame(cache, probs, rows), args.out, args.force)
    except KeyboardInterrupt:
        err.print("interrupted: nothing written", highlight=False)
        return EXIT_INTERRUPTED
    except (RefitError, EnsembleError, DataError, studies.StorageError, ValueError) as e:
        print_error(err, str(e))
        return EXIT_BAD_INPUT
    out.print(f"wrote {len(rows)} predictions to {path}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(refit_main())
