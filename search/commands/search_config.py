"""``pcam-search``'s config from its flags (``build_config``), checked, and the trials that run
at once on the resources it asks for."""

from __future__ import annotations

import argparse
import shlex
import sys

from rich.console import Console

import models
from data_pipeline.dataset import DataConfig
from search.common import study as studies
from search.common.config import PRETRAINED_HUB, SearchConfig, for_device
from search.common.defaults import FOLD_SEED, FOLD_STRATEGIES, MIN_BUDGET_S
from search.tuning.space import Space

# Settings a study keeps for life: trials scored differently are not comparable.
FROZEN_SETTINGS = ("folds", "fold_strategy", "fold_seed", "max_epochs")


def build_config(args: argparse.Namespace, has_gpu: bool) -> SearchConfig:
    """The one config of this run: flags, else the CPU or GPU defaults."""
    d = for_device(has_gpu)
    pick = lambda v, default: default if v is None else v  # noqa: E731
    # a final model trains long after a deadline search (--budget's last step, or pcam-refit
    # --best after --timeout): its trials are short complete runs that rank the params
    short = args.budget is not None and args.search_share < 1 or args.timeout is not None
    return SearchConfig(
        data=DataConfig(
            data=args.data, cache_dir=args.cache_dir, skip_bad=args.skip_bad, workers=args.workers
        ),
        study=args.study,
        storage=args.storage,
        studies_dir=args.studies_dir,
        trials=args.trials,
        folds=pick(args.folds, d.folds),
        fold_strategy=pick(args.fold_strategy, FOLD_STRATEGIES[0]),
        fold_seed=pick(args.fold_seed, FOLD_SEED),
        max_epochs=pick(args.max_epochs, d.budget_max_epochs if short else d.max_epochs),
        grace_period=pick(args.grace_period, d.grace_period),
        reduction_factor=pick(args.reduction_factor, d.reduction_factor),
        asha=not args.no_asha,
        promote=not (args.no_promote or short),
        race_epochs=0 if args.no_race else pick(args.race_epochs, d.race_epochs),
        timeout=args.timeout,
        budget=args.budget,
        search_share=args.search_share,
        final_target_epochs=d.final_target_epochs,
        final_max_epochs=d.final_max_epochs,
        final_seed_epochs=d.final_seed_epochs,
        final_fit=args.final_fit,
        keep_top=args.keep_top,
        cpus_per_trial=pick(args.cpus_per_trial, d.cpus_per_trial),
        gpus_per_trial=pick(args.gpus_per_trial, d.gpus_per_trial if has_gpu else 0),
        concurrency=args.concurrency,
        address=args.address,
        space=pick(args.space, d.space),
        pretrained=args.pretrained,
        sampler=args.sampler,
        seed=args.seed,
        verbose=args.verbose,
        progress=not (args.no_progress or args.verbose) and sys.stderr.isatty(),
    )


def check_config(cfg: SearchConfig) -> None:
    studies.check_study_name(cfg.study)
    if cfg.trials < 1 or cfg.folds < 2 or cfg.max_epochs < 1 or cfg.grace_period < 1:
        raise ValueError("--trials and --max-epochs must be >= 1, --folds >= 2, grace >= 1")
    if cfg.race_epochs < 0 or cfg.keep_top < 0:
        raise ValueError("--race-epochs and --keep-top must be >= 0")
    if cfg.reduction_factor < 2:
        raise ValueError(f"--reduction-factor must be >= 2, got {cfg.reduction_factor}")
    if cfg.cpus_per_trial <= 0 or cfg.gpus_per_trial < 0:
        raise ValueError("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
    for name, v in (("--timeout", cfg.timeout), ("--budget", cfg.budget)):
        if v is not None and v <= 0:
            raise ValueError(f"{name} must be > 0 seconds, got {v}")
    if cfg.budget is not None and cfg.budget < MIN_BUDGET_S:
        raise ValueError(
            f"--budget {cfg.budget:g} s is too short: starting Ray and the data alone takes "
            f"20-40 s; give at least {MIN_BUDGET_S:.0f} s"
        )
    if not 0 < cfg.search_share <= 1:
        raise ValueError(f"--search-share must be in (0, 1], got {cfg.search_share}")


def safe_argv(argv: list[str]) -> str:
    """The command line as typed, with passwords in URLs masked."""
    return shlex.join(["pcam-search", *(studies.safe_url(a) if "://" in a else a for a in argv)])


def check_weights(cfg: SearchConfig, space: Space, console: Console | None = None) -> None:
    """Fail before any trial when asked-for pretrained weights are missing. ``--pretrained
    hub``: fetch each arch's weights into the local caches first, here on the driver, once;
    the trials then read the caches (they never download)."""
    if not cfg.pretrained:
        return
    archs = list(space.params.get("arch", {}).get("choices", [])) or [space.fixed.get("arch")]
    for arch in archs:
        if arch and arch != "simple_cnn":
            if cfg.pretrained == PRETRAINED_HUB:
                if console is not None:
                    console.print(f"pretrained weights for {arch}: cache or download ...")
                models.fetch_weights(arch)
            models.create(arch, pretrained=cfg.pretrained_arg)


def trials_at_once(cpus: float, gpus: float, cpus_per_trial: float, gpus_per_trial: float) -> int:
    """How many trials fit the cluster's ``cpus`` and ``gpus`` at once. Exact for shares
    like 0.2 or 0.33: a float division floored (1 // 0.2 == 4.0) loses a trial; Ray counts
    resources in units of 1e-4, so a share is rounded to those first."""

    def fit(have: float, each: float) -> int:
        return round(have * 10_000) // max(1, round(each * 10_000))

    n = fit(cpus, cpus_per_trial)
    return min(n, fit(gpus, gpus_per_trial)) if gpus_per_trial > 0 else n


def fit_concurrency(cfg: SearchConfig) -> int:
    from search.tuning import ray_adapter

    res = ray_adapter.cluster_resources()
    n = trials_at_once(
        res.get("CPU", 1), res.get("GPU", 0), cfg.cpus_per_trial, cfg.gpus_per_trial
    )
    if n < 1:
        raise ValueError(
            f"the Ray cluster ({res.get('CPU', 0)} CPUs, {res.get('GPU', 0)} GPUs) cannot run one "
            f"trial of {cfg.cpus_per_trial} CPUs and {cfg.gpus_per_trial} GPUs"
        )
    return n
