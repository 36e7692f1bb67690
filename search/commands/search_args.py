"""The ``pcam-search`` command line: its parser, and the entry point that parses first.

Only the standard library and ``search.common.defaults`` are imported here, so ``--help``,
``--version`` and argument errors answer in well under a second; torch, Ray and Optuna are
imported (by ``search.commands.search``) once the arguments are known to be good.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from data_pipeline.cli_common import add_cache_dir, add_no_progress
from data_pipeline.version import add_version, help_text
from search.common.cli_args import add_study_args
from search.common.defaults import (
    CPU_DEFAULTS,
    DEFAULT_KEEP_TOP,
    DEFAULT_TRIALS,
    FINAL_FITS,
    FOLD_SEED,
    FOLD_STRATEGIES,
    GPU_DEFAULTS,
    SAMPLERS,
    SEARCH_SHARE,
    cpu_gpu,
)

DESCRIPTION = """``pcam-search``: a k-fold cross-validated hyperparameter search, Optuna study +
Ray Tune + ASHA.

pcam-search --budget 600                 # 10 minutes end to end: search, final model, submission
pcam-search --trials 200                 # embedded data, study "pcam" in studies/pcam.db
pcam-search --data DIR --storage postgresql://user@host/db --gpus-per-trial 0.25
pcam-search --address 10.0.0.1:6379      # join a Ray cluster started with `ray start`

Run the same command again to continue: --trials counts every finished trial of the study.
"""


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pcam-search",
        description=help_text(DESCRIPTION),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version(ap)
    a = ap.add_argument
    a(
        "--trials",
        type=int,
        default=DEFAULT_TRIALS,
        help="finished trials wanted in the study, earlier runs included (default: %(default)s)",
    )
    a(
        "--data",
        type=Path,
        default=None,
        help="Kaggle or PCam folder (default: the embedded synthetic dataset)",
    )
    add_study_args(ap)
    a(
        "--space",
        default=None,
        help=f"search space file, a path or a name in studies/ (default: {cpu_gpu('space')})",
    )
    a("--folds", type=int, default=None, help=f"k of k-fold CV (default: {cpu_gpu('folds')})")
    a(
        "--fold-strategy",
        choices=FOLD_STRATEGIES,
        default=None,
        help="slide-grouped folds (default) or random (leaks slides; only to measure that)",
    )
    a(
        "--fold-seed",
        type=int,
        default=None,
        help=f"seed of the fold assignment, kept with the study (default: {FOLD_SEED})",
    )
    a(
        "--max-epochs",
        type=int,
        default=None,
        help="epochs of a trial never stopped early (default: "
        f"{cpu_gpu('max_epochs')}; with --budget or --timeout {cpu_gpu('budget_max_epochs')}: "
        "short complete trials, the winner then trains long in the final model)",
    )
    a(
        "--grace-period",
        type=int,
        default=None,
        help="ASHA: fold-epochs before a trial may be stopped (default: "
        f"{CPU_DEFAULTS.grace_period} = fold 0 at epoch {CPU_DEFAULTS.race_epochs})",
    )
    a(
        "--reduction-factor",
        type=int,
        default=None,
        help=f"ASHA eta: 1/eta of trials continue at each rung (default: "
        f"{CPU_DEFAULTS.reduction_factor})",
    )
    a("--no-asha", action="store_true", help="run every trial for --max-epochs")
    a(
        "--no-promote",
        action="store_true",
        help="no growing top rung: without a deadline the study's best params otherwise train "
        "again as new trials of 2x, 4x .. the epochs as COMPLETE trials accumulate, up to "
        f"the final model's ({cpu_gpu('final_max_epochs')})",
    )
    a(
        "--race-epochs",
        type=int,
        default=None,
        help="fold racing: epochs fold 0 trains alone before the other folds start (default: "
        f"{CPU_DEFAULTS.race_epochs})",
    )
    a(
        "--no-race",
        action="store_true",
        help="train all folds of a trial in lockstep from epoch 1 (= --race-epochs 0)",
    )
    a(
        "--timeout",
        type=float,
        default=None,
        help="seconds for this search: no trial starts that could not pass its first rung by "
        "then, and one that cannot finish at its pace now is stopped; stopped trials are "
        "re-run first on resume (the same command again); then pcam-refit --best",
    )
    a(
        "--budget",
        type=float,
        default=None,
        help="seconds end to end: the search (--search-share of it), then the best params "
        "trained again on every fold for as many epochs as fit the rest, and the submission",
    )
    a(
        "--search-share",
        type=float,
        default=SEARCH_SHARE,
        help="--budget: the least share of the budget the search gets; the rest is reserved "
        "for the final model, as much as it needs to train its target epochs "
        f"({cpu_gpu('final_target_epochs')}) "
        "at the observed pace (1 = search all of it and submit the best trial's own fold "
        "models; default: %(default)s)",
    )
    a(
        "--final-fit",
        choices=FINAL_FITS,
        default=FINAL_FITS[0],
        help="--budget: the final model is the best params trained on every labelled patch "
        "(full: one model, more seeds once one has its epoch cap) or on each fold (folds: k "
        "models, whose out-of-fold AUC is their own); default: %(default)s",
    )
    a(
        "--keep-top",
        type=int,
        default=DEFAULT_KEEP_TOP,
        help="keep the fold models of this many best COMPLETE trials in studies/<study>/models "
        "(pcam-refit --reuse submits them without training; pcam-refit --ensemble selects "
        "among them; default: %(default)s)",
    )
    a(
        "--cpus-per-trial",
        type=float,
        default=None,
        help=f"CPU threads per trial (default: {cpu_gpu('cpus_per_trial')})",
    )
    a(
        "--gpus-per-trial",
        type=float,
        default=None,
        help="GPU share per trial, fractions allowed: 0.25 = 4 trials per GPU (default: GPU "
        f"{GPU_DEFAULTS.gpus_per_trial})",
    )
    a(
        "--concurrency",
        type=int,
        default=None,
        help="trials at once (default: as many as the resources allow)",
    )
    a(
        "--address",
        default=None,
        help="join an existing Ray cluster (host:port or 'auto'; default: $RAY_ADDRESS if set, "
        "else a private local Ray, even when a `ray start` cluster runs on this machine)",
    )
    a(
        "--pretrained",
        default=None,
        help="pretrained weights: a file; 'cache' (timm's weights from the local HF/torch "
        "caches); or 'hub' (downloaded into those caches once, by this process, if missing). "
        "Enables searching the number of unfrozen ResNet stages",
    )
    a(
        "--sampler",
        choices=SAMPLERS,
        default=SAMPLERS[0],
        help="Optuna's TPE: each parameter on its own (tpe), or jointly within groups of "
        "trials that share parameters (tpe-multivariate); default: %(default)s",
    )
    a("--seed", type=int, default=0, help="sampler and training seed (default: %(default)s)")
    add_cache_dir(ap)
    a("--skip-bad", action="store_true", help="leave bad data rows out instead of stopping")
    a("--workers", type=int, default=None, help="decode processes for the cache build")
    a("--verbose", action="store_true", help="Ray's own logs instead of the live view")
    add_no_progress(ap, "no live view (plain log lines)")
    a(
        "--json",
        action="store_true",
        help="print one JSON object on stdout at the end (best trial, value, params, study, "
        "storage, exit code); the rest goes to stderr",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    """The ``pcam-search`` entry point: parse (fast), then run the search."""
    t_cmd = time.monotonic()  # --budget counts from here: the imports below are in it
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    # the imports and Ray's start take ~20 s on 2 cores: say what is happening meanwhile
    print("pcam-search: loading torch, Ray and Optuna ...", file=sys.stderr, flush=True)
    from search.commands.search import (
        run_args,  # torch, Ray, Optuna: only for a command that will run
    )

    return run_args(args, argv, t_cmd)


if __name__ == "__main__":
    sys.exit(main())
