"""``pcam-search``: a k-fold cross-validated hyperparameter search, Optuna study + Ray Tune + ASHA.

pcam-search --trials 200                 # embedded data, study "pcam" in studies/pcam.db
pcam-search --data DIR --storage postgresql://user@host/db --gpus-per-trial 0.25
pcam-search --address 10.0.0.1:6379      # join a Ray cluster started with `ray start`

Run the same command again to continue: --trials counts every finished trial of the study.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shlex
import sys
import time
import traceback
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna
import torch
from optuna.trial import TrialState
from rich.console import Console
from rich.markup import escape

import models
from data_pipeline.cache import available_cpus, cache_root_dir
from data_pipeline.cli_common import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED
from data_pipeline.dataset import DataConfig, open_dataset
from data_pipeline.folds import (
    folds_file,
    folds_for_cache,
    slide_coverage,
    slide_map_warning,
)
from data_pipeline.problems import DataError
from search.common import study as studies
from search.common.attrs import (
    AUC_FOLDS,
    COMMAND,
    CONFIG,
    DATASET_FINGERPRINT,
    FOLD_EPOCHS,
    FOLDS_FILE,
    REFIT,
    RUNS,
    SPACE,
    VERSION,
    get_record,
    set_record,
)
from search.common.cli_args import print_error, study_flags
from search.common.config import PRETRAINED_HUB, SearchConfig, for_device
from search.common.defaults import FOLD_SEED, FOLD_STRATEGIES, MIN_BUDGET_S
from search.training.engine import TrainData
from search.tuning.deadline import (
    FULL_FIT_FACTOR,
    MARGIN,
    REFIT_FACTOR,
    REFIT_FIXED_S,
    TIE_AUC,
    Deadline,
    Pace,
    final_epochs,
    full_fit_plan,
    full_fold_epochs,
    pick_final,
)
from search.tuning.progress import Tally, live
from search.tuning.sampler import make_sampler
from search.tuning.space import Space, SpaceError, load_space, skipped_for_weights, suggest

METRIC_NAME = "mean fold AUC"  # what a trial's value is, as optuna-dashboard labels it
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


def _check_config(cfg: SearchConfig) -> None:
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


def _check_weights(cfg: SearchConfig, space: Space, console: Console | None = None) -> None:
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


def _open_study(
    cfg: SearchConfig, storage: optuna.storages.BaseStorage, console: Console
) -> optuna.Study:
    study = optuna.create_study(
        storage=storage, study_name=cfg.study, direction="maximize", load_if_exists=True
    )
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise ValueError(f"study {cfg.study!r} exists and minimizes; pcam-search maximizes AUC")
    if study.metric_names != [METRIC_NAME]:
        with warnings.catch_warnings():  # experimental in Optuna (since 3.2), stable enough
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([METRIC_NAME])  # optuna-dashboard's axis, not "Objective 0"
    zombies = studies.fail_zombies(study)
    if zombies:
        console.print(
            f"[yellow]marked {len(zombies)} trial(s) left RUNNING by a stopped search "
            f"as FAIL (interrupted; they will be re-run): {zombies}[/]"
        )
    return study


def _resume_settings(
    cfg: SearchConfig, study: optuna.Study, explicit: frozenset[str], console: Console
) -> SearchConfig:
    """An existing study's frozen settings (folds, epochs, ...) that the user did not give on
    this command line are the study's own: resuming needs only ``--trials``."""
    prev = get_record(study, CONFIG) or {}
    take = {
        k: prev[k]
        for k in FROZEN_SETTINGS
        if k in prev and k not in explicit and prev[k] != getattr(cfg, k)
    }
    if take:
        console.print(f"study {cfg.study!r} exists: using its own settings {take}")
        cfg = replace(cfg, **take)
    return cfg


def _record_study(
    study: optuna.Study,
    cfg: SearchConfig,
    space: Space,
    fingerprint: str,
    folds_file: str,
    argv: list[str],
) -> None:
    """Study user attrs: what the trials were scored on. A mismatch with an earlier run is an
    error (trials would not be comparable)."""
    attrs = study.user_attrs
    prev = get_record(study, CONFIG)
    if prev:
        if attrs.get(DATASET_FINGERPRINT) != fingerprint:
            raise ValueError(
                f"study {cfg.study!r} was searched on dataset {attrs.get('dataset_fingerprint')}, "
                f"this run reads {fingerprint}: use another --study"
            )
        now = cfg.to_dict()
        diff = {k: (prev.get(k), now[k]) for k in FROZEN_SETTINGS if prev.get(k) != now[k]}
        if diff:
            raise ValueError(
                f"study {cfg.study!r} was searched with other settings {diff} (earlier, now): "
                "use the same flags or another --study"
            )
    else:
        study.set_user_attr(DATASET_FINGERPRINT, fingerprint)
        study.set_user_attr(FOLDS_FILE, folds_file)
    set_record(study, CONFIG, cfg.to_dict())
    set_record(study, SPACE, space.to_dict())
    study.set_user_attr(VERSION, importlib.metadata.version("pcam-search"))
    runs = list(get_record(study, RUNS, []))
    runs.append({"started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": safe_argv(argv)})
    set_record(study, RUNS, runs[-50:])
    study.set_user_attr(COMMAND, safe_argv(argv))


def next_commands(cfg: SearchConfig) -> list[str]:
    """The dashboard, refit and report commands for this study, runnable as printed from any
    folder: absolute paths, and the storage whenever it is not the default (a password in it
    is masked: put it back, or use a .pgpass file)."""
    url = studies.safe_url(cfg.storage_url)
    where = study_flags(cfg.study, cfg.studies_dir, cfg.storage)
    return [
        shlex.join(["optuna-dashboard", url]),
        shlex.join(["pcam-refit", "--best", *where]),
        shlex.join(["pcam-report", *where]),
    ]


def _summary(console: Console, study: optuna.Study, cfg: SearchConfig, tally: Tally) -> None:
    counts = studies.tally(study)
    console.print(
        f"study [bold]{cfg.study}[/] in {studies.safe_url(cfg.storage_url)}: "
        + ", ".join(f"{k.lower()} {v}" for k, v in sorted(counts.items()))
        + f"  (this run: {tally.finished} finished, {tally.fold_epochs} fold-epochs trained)"
    )
    best = studies.best_trial(study)
    if best is not None:
        folds = best.user_attrs.get(AUC_FOLDS, [])
        console.print(
            f"best mean {cfg.folds}-fold AUC [bold green]{best.value:.4f}[/] "
            f"(trial {best.number}; folds {', '.join(f'{a:.4f}' for a in folds)})"
        )
        console.print("  " + ", ".join(f"{k}={v}" for k, v in best.params.items()))
    models_dir = cfg.out_dir / "models"
    if models_dir.is_dir():
        kept = [d for d in models_dir.iterdir() if d.is_dir() and not d.name.startswith(".")]
        size = sum(f.stat().st_size for d in kept for f in d.iterdir())
        console.print(
            f"fold models of the best {len(kept)} COMPLETE trial(s) kept in {models_dir} "
            f"({size / 1e6:.1f} MB; --keep-top {cfg.keep_top})",
            highlight=False,
        )
    console.print("next:")
    for c in next_commands(cfg):
        console.print(f"  {c}", highlight=False, markup=False)


def run(
    cfg: SearchConfig,
    argv: list[str],
    console: Console,
    t_cmd: float | None = None,
    explicit: frozenset[str] = frozenset(FROZEN_SETTINGS),
) -> int:
    """The search: data -> folds -> study -> Ray Tune trials -> summary (-> refit: --budget).

    ``t_cmd``: ``time.monotonic()`` when the command started (the budget counts from there).
    ``explicit``: the frozen settings the user gave; the others come from an existing study.
    """
    t_cmd = time.monotonic() if t_cmd is None else t_cmd

    space = load_space(cfg.space)
    _check_weights(cfg, space, console)
    skipped = [] if cfg.pretrained else skipped_for_weights(space)
    if skipped:
        console.print(
            f"no pretrained weights (--pretrained): not searching {skipped}; "
            "ResNets train all stages"
        )
    cache = open_dataset(cfg.data, progress=cfg.progress)  # bad data: no study is created
    storage = studies.make_storage(cfg.storage_url)
    study = _open_study(cfg, storage, console)
    cfg = _resume_settings(cfg, study, explicit, console)
    requeued = studies.requeue_interrupted(study)  # run first, by this run or the next
    if requeued:
        console.print(f"re-running first the params of interrupted trial(s) {requeued}")
    done = studies.count_finished(study)
    remaining = cfg.trials - done
    if remaining <= 0:
        console.print(
            f"study {cfg.study!r} already has {done} finished trials (--trials "
            f"{cfg.trials}); raise --trials to search more"
        )
        _summary(console, study, cfg, Tally(target=0, finished_before=done))
        return 0

    folds_df = folds_for_cache(cache, cfg.folds, cfg.fold_seed, cfg.fold_strategy)
    where = str(folds_file(cache, cfg.folds, cfg.fold_seed, cfg.fold_strategy))
    _record_study(study, cfg, space, cache.fingerprint, where, argv)
    data = TrainData.from_cache(cache, folds_df["row"].to_numpy())
    _check_nodes(data)
    folds = folds_df["fold"].to_numpy(np.int64)
    warn = slide_map_warning(slide_coverage(cache.index["slide"].to_numpy()[folds_df["row"]]))
    if warn and cfg.fold_strategy == "slide":
        console.print(f"[yellow]warning: {escape(warn)}[/]", highlight=False)

    concurrency = cfg.concurrency or _fit_concurrency(cfg)
    console.print(
        f"searching study [bold]{cfg.study}[/] ({studies.safe_url(cfg.storage_url)}): "
        f"{remaining} more trial(s), {done} finished before; {len(data.labels)} patches, "
        f"{cfg.folds} {Path(where).name.split('-k')[0]} folds, up to {cfg.max_epochs} epochs"
        + (f" (fold 0 alone for {cfg.race_epochs})" if cfg.race_epochs else "")
        + f", {concurrency} at once, space {cfg.space}"
        + (f", budget {cfg.budget:.0f} s (search + submission)" if cfg.budget else "")
        + (f", search timeout {cfg.timeout:.0f} s" if cfg.timeout else "")
    )
    deadline = Deadline(
        full_fold_epochs=cfg.folds * cfg.max_epochs,
        first_rung=min(cfg.grace_period, cfg.folds * cfg.max_epochs) if cfg.asha else None,
        timeout=cfg.timeout,
        # the budget counts from the command's start (Ray and the data took some already)
        budget=None if cfg.budget is None else cfg.budget - (time.monotonic() - t_cmd),
        predict_images=len(cache.rows("test")) * cfg.tta,
        retrain=cfg.keep_top < 1,
        search_share=cfg.search_share,
        final_fold_epochs=_final_fold_epochs(cfg) if cfg.search_share < 1 else 0,
        final_factor=FULL_FIT_FACTOR if cfg.final_fit == "full" else REFIT_FACTOR,
    )
    tally = Tally(target=remaining, finished_before=done, echo=None if cfg.progress else console)
    if not study.trials:  # a new study starts from the space's known-good recipes
        for params in space.start:
            study.enqueue_trial(params, skip_if_exists=True)
    meta = {"study": cfg.study, "dataset_fingerprint": cache.fingerprint, "folds_file": where}
    interrupted = _search(
        cfg, study, storage, space, (data, folds, meta), deadline, tally, concurrency, console
    )
    _summary(console, study, cfg, tally)
    if tally.halted:
        print_error(console, tally.halted)
        return EXIT_FAILED
    # Ray Tune catches Ctrl-C itself and returns early: short of the target without the
    # deadline having ended the run means interrupted
    interrupted |= tally.finished < tally.target and not deadline.reached
    if deadline.reached and deadline.settled and deadline.starved():
        target = cfg.final_target_epochs  # k fold models; one full-data model: k-1 times more
        if cfg.final_fit == "full":
            target = round(_final_fold_epochs(cfg) / full_fold_epochs(cfg.folds))
        console.print(
            f"[yellow]budget too small to search: the final model needs ~"
            f"{deadline.final_s():.0f} s for {target} epochs ({cfg.final_fit} fit), "
            f"more than {1 - cfg.search_share:.0%} of the budget; the search stopped at its "
            "first COMPLETE trial and the rest trains the final model[/]"
        )
    elif deadline.reached and tally.finished < tally.target:
        first = deadline.first_rung_s() or 0.0
        console.print(
            f"[yellow]deadline reached: the search ended {deadline.end():.0f} s after it "
            f"started; {deadline.not_started} trial(s) not started (a trial needs ~{first:.0f}"
            f" s to finish or pass its first rung); {tally.interrupted} running trial(s) "
            "stopped: they could not train every fold-epoch in time (re-run on resume); "
            f"waste {tally.waste:.0%} ({tally.wasted} of {tally.fold_epochs} fold-epochs went "
            "to trials stopped unfinished)[/]"
        )
    if interrupted:
        console.print("[yellow]interrupted: run the same command again to continue[/]")
        return EXIT_INTERRUPTED
    if studies.best_trial(study) is None:
        return _no_result(console, study)
    if cfg.budget is not None:
        return _refit_in_budget(cfg, console, t_cmd, deadline)
    return 0


def json_summary(cfg: SearchConfig, rc: int) -> dict:
    """``--json``: the run's outcome for scripts: exit code, study, storage (no password),
    the best COMPLETE trial (number, value, params) and the submission of a --budget run."""
    url = cfg.storage_url
    study = optuna.load_study(study_name=cfg.study, storage=studies.open_existing(url))
    best = studies.best_trial(study)
    refit = get_record(study, REFIT) or {}
    return {
        "exit_code": rc,
        "study": cfg.study,
        "storage": studies.safe_url(url),
        "best_trial": None if best is None else best.number,
        "value": None if best is None else best.value,
        "params": {} if best is None else best.params,
        "counts": studies.tally(study),
        "submission": refit.get("submission") if cfg.budget is not None else None,
    }


def _no_result(console: Console, study: optuna.Study) -> int:
    """A search that left no COMPLETE trial failed: say which error ended most trials."""
    f = studies.failures(study)
    why = (
        f"{f.total} trial(s) failed; the commonest error, in {f.count}: {f.error_type}: "
        f"{f.example}"
        if f.total
        else "no trial finished training"
    )
    name = study.study_name
    return print_error(console, f"study {name!r} has no COMPLETE trial: {why}", EXIT_FAILED)


def _check_nodes(data: TrainData) -> None:
    """Every Ray node that may run a trial reads the same cache file (ValueError if not)."""
    from search.tuning import ray_adapter

    problems = ray_adapter.check_data_on_nodes(data)
    if problems:
        raise ValueError(
            "the data cache is not readable the same on every Ray node (trials map "
            f"{getattr(data.images, 'path', 'the pool')} there):\n  "
            + "\n  ".join(problems)
            + "\nuse a --cache-dir "
            "every node shares, or build the cache on each node from the same files"
        )


def _search(
    cfg: SearchConfig,
    study: optuna.Study,
    storage: optuna.storages.BaseStorage,
    space: Space,
    data_folds: tuple[TrainData, np.ndarray, dict],
    deadline: Deadline,
    tally: Tally,
    concurrency: int,
    console: Console,
) -> bool:
    """Run the Ray Tune trials; True if interrupted by Ctrl-C."""
    from search.tuning import ray_adapter  # Ray is heavy: import it only when searching

    data, folds, meta = data_folds
    prior = studies.best_trial(study)
    if prior is not None:
        tally.offer_best(prior.number, studies.value_of(prior), prior.params)
        deadline.settled = True  # no trial needs guarding: the study can already submit
    # a resumed run does not replay the same draws
    sampler = make_sampler(cfg.sampler, cfg.seed + len(study.trials))
    settings = ray_adapter.TrialSettings(
        max_epochs=cfg.max_epochs,
        seed=cfg.seed,
        threads=max(1, int(cfg.cpus_per_trial)),
        pretrained=cfg.pretrained_arg,
        race_epochs=cfg.race_epochs,
        models_dir=str(cfg.out_dir / "models") if cfg.keep_top > 0 else None,
        model_meta=meta,
        gpu_share=cfg.gpus_per_trial,
    )
    resources = ray_adapter.Resources(cfg.cpus_per_trial, cfg.gpus_per_trial, concurrency)
    pretrained = bool(cfg.pretrained)
    try:
        with live(tally, cfg.progress, console):
            ray_adapter.run_trials(
                study=study,
                storage=storage,
                space_fn=lambda t: suggest(t, space, pretrained),
                sampler=sampler,
                n_trials=tally.target,
                data=data,
                folds=folds,
                settings=settings,
                resources=resources,
                grace_period=cfg.grace_period,
                reduction_factor=cfg.reduction_factor,
                asha=cfg.asha,
                deadline=deadline,
                tally=tally,
                driver=studies.driver_id(),
                storage_path=str(cfg.out_dir / "ray"),
                verbose=cfg.verbose,
                keep_top=cfg.keep_top,
            )
    except KeyboardInterrupt:
        return True
    except Exception as e:
        if not type(e).__module__.startswith("ray"):
            raise
        raise RayDown(_ray_down(e, cfg)) from None
    return False


class RayDown(RuntimeError):
    """Ray's machinery failed during the search (the raylet or the GCS died)."""


LOG_FILE = "pcam-search.log"  # in studies/<study>/: tracebacks the console does not show


def _ray_down(e: Exception, cfg: SearchConfig) -> str:
    """The one line said when Ray went down mid-search; its traceback goes to the log."""
    log = cfg.out_dir / LOG_FILE
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} Ray failed during the search\n")
        traceback.print_exception(e, file=f)
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return (
        f"Ray failed during the search ({type(e).__name__}: {first}); the study is consistent: "
        "trials that were running are interrupted and run again first when you run the same "
        f"command again. Details: {log}"
    )


def _final_fold_epochs(cfg: SearchConfig) -> int:
    """Fold-epochs --budget reserves for the final model: what ``final_target_epochs`` of k
    fold models cost, whichever the fit. A full-data model gets k-1 times those epochs for it
    (CPU: 48, its cap), not a smaller reserve: at 5-10 minutes on 2 cores the final model's
    epochs, not more search, decide the test AUC (docs/benchmarks.md, "Model quality per
    unit of compute")."""
    return cfg.folds * cfg.final_target_epochs


def _final_plan(
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


def _refit_in_budget(cfg: SearchConfig, console: Console, t_cmd: float, deadline: Deadline) -> int:
    """--budget: the final model (the best params for as many epochs as fit, or the best
    trial's own fold models) and its submission, in the time the search left."""
    from search.submission.inputs import RefitConfig, RefitError
    from search.submission.refit import refit
    from search.tuning import ray_adapter

    assert cfg.budget is not None  # only --budget refits in the same command
    ray_adapter.shutdown_ray()  # free the cores for the refit
    study = optuna.load_study(study_name=cfg.study, storage=studies.make_storage(cfg.storage_url))
    trial, epochs, full_models = _final_plan(cfg, study, t_cmd, deadline, console)
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


def trials_at_once(cpus: float, gpus: float, cpus_per_trial: float, gpus_per_trial: float) -> int:
    """How many trials fit the cluster's ``cpus`` and ``gpus`` at once. Exact for shares
    like 0.2 or 0.33: a float division floored (1 // 0.2 == 4.0) loses a trial; Ray counts
    resources in units of 1e-4, so a share is rounded to those first."""

    def fit(have: float, each: float) -> int:
        return round(have * 10_000) // max(1, round(each * 10_000))

    n = fit(cpus, cpus_per_trial)
    return min(n, fit(gpus, gpus_per_trial)) if gpus_per_trial > 0 else n


def _fit_concurrency(cfg: SearchConfig) -> int:
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


def run_args(args: argparse.Namespace, argv: list[str], t_cmd: float | None = None) -> int:
    """Run the search the parsed command line asks for; the exit code. ``t_cmd``:
    ``time.monotonic()`` when the command started (default: now)."""
    t_cmd = time.monotonic() if t_cmd is None else t_cmd
    optuna.logging.set_verbosity(optuna.logging.INFO if args.verbose else optuna.logging.WARNING)
    console = Console(stderr=True, soft_wrap=True)  # no hard breaks inside paths and URLs
    # --json: stdout holds the one JSON summary; everything else goes to stderr
    out = Console(soft_wrap=True, stderr=args.json)
    try:
        # the storage first: a bad URL or file fails in a second, not after Ray's ~20 s start
        studies.check_study_name(args.study)
        url = SearchConfig(storage=args.storage, studies_dir=args.studies_dir).storage_url
        studies.check_storage(url, write=True)
        cache_root_dir(args.cache_dir)  # a file there, or a read-only HOME: said before Ray
        # flags and a given space file: checked before Ray's ~20 s start (the defaults,
        # which depend on the cluster's GPUs, are valid either way)
        _check_config(build_config(args, has_gpu=False))
        if args.space:
            load_space(args.space)
        from search.tuning import ray_adapter

        ray_adapter.check_internals()
        if args.address is None:
            cpus, gpus = available_cpus(), torch.cuda.device_count()
            env = os.environ.get("RAY_ADDRESS")  # init_ray joins it, as Ray's scripts do
            say = f"joining the Ray cluster at {env}" if env else f"starting a private Ray ({cpus}"
            console.print(say + ("" if env else f" CPUs, {gpus} GPUs)") + " ...", highlight=False)
            ray_adapter.init_ray(None, cpus, gpus, args.verbose)
        else:
            console.print(f"joining the Ray cluster at {args.address} ...", highlight=False)
            ray_adapter.init_ray(args.address, None, None, args.verbose)
        has_gpu = ray_adapter.cluster_resources().get("GPU", 0) > 0
        cfg = build_config(args, has_gpu)
        _check_config(cfg)
        given = frozenset(k for k in FROZEN_SETTINGS if getattr(args, k, None) is not None)
        rc = run(cfg, argv, out, t_cmd, given)
        if args.json:
            print(json.dumps(json_summary(cfg, rc), default=str))
        return rc
    except DataError as e:
        # the message already summarises the problems, naming the files and ids
        print_error(console, str(e))
        return EXIT_BAD_INPUT
    except (
        SpaceError,
        studies.StorageError,
        studies.StudyBusyError,
        models.MissingWeightsError,
        models.UnknownModelError,
        ValueError,
        ConnectionError,
    ) as e:
        print_error(console, str(e))
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        console.print("interrupted")
        return EXIT_INTERRUPTED
    except RuntimeError as e:
        if type(e).__name__ not in ("InternalsChanged", "RayStartError", "RayDown"):
            raise
        print_error(console, str(e))
        return EXIT_FAILED
    finally:
        if "ray_adapter" in locals():
            ray_adapter.shutdown_ray()
