"""``pcam-search``: a k-fold cross-validated hyperparameter search, Optuna study + Ray Tune + ASHA.

pcam-search --trials 200                 # embedded data, study "pcam" in studies/pcam.db
pcam-search --data DIR --storage postgresql://user@host/db --gpus-per-trial 0.25
pcam-search --address 10.0.0.1:6379      # join a Ray cluster started with `ray start`

Run the same command again to continue: --trials counts every finished trial of the study.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import optuna
import torch
from rich.console import Console
from rich.markup import escape

import models
from data_pipeline.cache import Cache, available_cpus, cache_root_dir
from data_pipeline.cli_common import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED
from data_pipeline.dataset import open_dataset
from data_pipeline.folds import (
    folds_file,
    folds_for_cache,
    slide_coverage,
    slide_map_warning,
)
from data_pipeline.problems import DataError
from search.commands.final_step import final_fold_epochs, refit_in_budget
from search.commands.search_config import (
    FROZEN_SETTINGS,
    build_config,
    check_config,
    check_weights,
    fit_concurrency,
)
from search.commands.search_study import (
    json_summary,
    no_result,
    open_study,
    print_summary,
    record_study,
    resume_settings,
)
from search.common import study as studies
from search.common.cli_args import print_error
from search.common.config import SearchConfig
from search.training.checkpoint import CHECKPOINTS_DIR
from search.training.engine import TrainData
from search.tuning.deadline import (
    FULL_FIT_FACTOR,
    REFIT_FACTOR,
    Deadline,
    full_fold_epochs,
)
from search.tuning.progress import Tally, live
from search.tuning.sampler import make_sampler
from search.tuning.space import Space, SpaceError, load_space, skipped_for_weights, suggest

if TYPE_CHECKING:  # Ray is imported only when a search runs
    from search.tuning import ray_adapter


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
    space = _load_space(cfg, console)
    cache = open_dataset(cfg.data, progress=cfg.progress)  # bad data: no study is created
    storage = studies.make_storage(cfg.storage_url)
    study = open_study(cfg, storage, console)
    cfg = resume_settings(cfg, study, explicit, console)
    requeued = studies.requeue_interrupted(study)  # run first, by this run or the next
    if requeued:
        console.print(f"re-running first the params of interrupted trial(s) {requeued}")
    done = studies.count_finished(study)
    if cfg.trials <= done:
        console.print(
            f"study {cfg.study!r} already has {done} finished trials (--trials "
            f"{cfg.trials}); raise --trials to search more"
        )
        print_summary(console, study, cfg, Tally(target=0, finished_before=done))
        return 0
    data_folds = _data_folds(cfg, cache, study, space, argv, console)
    concurrency = cfg.concurrency or fit_concurrency(cfg)
    _announce(cfg, console, done, len(data_folds[0].labels), data_folds[2], concurrency)
    deadline = _deadline(cfg, cache, t_cmd)
    tally = Tally(
        target=cfg.trials - done, finished_before=done, echo=None if cfg.progress else console
    )
    if not study.trials:  # a new study starts from the space's known-good recipes
        for params in space.start:
            study.enqueue_trial(params, skip_if_exists=True)
    interrupted = _search(
        cfg, study, storage, space, data_folds, deadline, tally, concurrency, console
    )
    print_summary(console, study, cfg, tally)
    if tally.halted:
        print_error(console, tally.halted)
        return EXIT_FAILED
    # Ray Tune catches Ctrl-C itself and returns early: short of the target without the
    # deadline having ended the run means interrupted
    interrupted |= tally.finished < tally.target and not deadline.reached
    _deadline_notes(cfg, deadline, tally, console)
    if interrupted:
        console.print("[yellow]interrupted: run the same command again to continue[/]")
        return EXIT_INTERRUPTED
    if studies.best_trial(study) is None:
        return no_result(console, study)
    if cfg.budget is not None:
        return refit_in_budget(cfg, console, t_cmd, deadline)
    return 0


def _load_space(cfg: SearchConfig, console: Console) -> Space:
    """The search space, checked against the weights the run has."""
    space = load_space(cfg.space)
    check_weights(cfg, space, console)
    skipped = [] if cfg.pretrained else skipped_for_weights(space)
    if skipped:
        console.print(
            f"no pretrained weights (--pretrained): not searching {skipped}; "
            "ResNets train all stages"
        )
    return space


def _data_folds(
    cfg: SearchConfig,
    cache: Cache,
    study: optuna.Study,
    space: Space,
    argv: list[str],
    console: Console,
) -> tuple[TrainData, np.ndarray, dict]:
    """(labelled pool, its folds, the kept models' metadata); the study records what the run
    searches on (data fingerprint, folds file, config, space)."""
    folds_df = folds_for_cache(cache, cfg.folds, cfg.fold_seed, cfg.fold_strategy)
    where = str(folds_file(cache, cfg.folds, cfg.fold_seed, cfg.fold_strategy))
    record_study(study, cfg, space, cache.fingerprint, where, argv)
    data = TrainData.from_cache(cache, folds_df["row"].to_numpy())
    _check_nodes(data)
    folds = folds_df["fold"].to_numpy(np.int64)
    warn = slide_map_warning(slide_coverage(cache.index["slide"].to_numpy()[folds_df["row"]]))
    if warn and cfg.fold_strategy == "slide":
        console.print(f"[yellow]warning: {escape(warn)}[/]", highlight=False)
    meta = {"study": cfg.study, "dataset_fingerprint": cache.fingerprint, "folds_file": where}
    return data, folds, meta


def _announce(
    cfg: SearchConfig, console: Console, done: int, n: int, meta: dict, concurrency: int
) -> None:
    kind = Path(meta["folds_file"]).name.split("-k")[0]
    console.print(
        f"searching study [bold]{cfg.study}[/] ({studies.safe_url(cfg.storage_url)}): "
        f"{cfg.trials - done} more trial(s), {done} finished before; {n} patches, "
        f"{cfg.folds} {kind} folds, up to {cfg.max_epochs} epochs"
        + (f" (fold 0 alone for {cfg.race_epochs})" if cfg.race_epochs else "")
        + f", {concurrency} at once, space {cfg.space}"
        + (f", budget {cfg.budget:.0f} s (search + submission)" if cfg.budget else "")
        + (f", search timeout {cfg.timeout:.0f} s" if cfg.timeout else "")
    )


def _deadline(cfg: SearchConfig, cache: Cache, t_cmd: float) -> Deadline:
    """The run's clock: --timeout, or --budget less what the start took and the final model's
    reserve; neither: no deadline."""
    return Deadline(
        full_fold_epochs=cfg.folds * cfg.max_epochs,
        first_rung=min(cfg.grace_period, cfg.folds * cfg.max_epochs) if cfg.asha else None,
        timeout=cfg.timeout,
        # the budget counts from the command's start (Ray and the data took some already)
        budget=None if cfg.budget is None else cfg.budget - (time.monotonic() - t_cmd),
        predict_images=len(cache.rows("test")) * cfg.tta,
        retrain=cfg.keep_top < 1,
        search_share=cfg.search_share,
        final_fold_epochs=final_fold_epochs(cfg) if cfg.search_share < 1 else 0,
        final_factor=FULL_FIT_FACTOR if cfg.final_fit == "full" else REFIT_FACTOR,
    )


def _deadline_notes(cfg: SearchConfig, deadline: Deadline, tally: Tally, console: Console) -> None:
    """Why a deadline search ended where it did: the budget too small, or the clock."""
    if deadline.reached and deadline.settled and deadline.starved():
        target = cfg.final_target_epochs  # k fold models; one full-data model: k-1 times more
        if cfg.final_fit == "full":
            target = round(final_fold_epochs(cfg) / full_fold_epochs(cfg.folds))
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
    run = _search_run(cfg, study, storage, space, meta, tally.target, concurrency)
    try:
        with live(tally, cfg.progress, console):
            ray_adapter.run_trials(run, data, folds, deadline, tally)
    except KeyboardInterrupt:
        return True
    except Exception as e:
        if not type(e).__module__.startswith("ray"):
            raise
        raise RayDown(_ray_down(e, cfg)) from None
    return False


def _search_run(
    cfg: SearchConfig,
    study: optuna.Study,
    storage: optuna.storages.BaseStorage,
    space: Space,
    meta: dict,
    n_trials: int,
    concurrency: int,
) -> ray_adapter.SearchRun:
    """What Ray runs: the study, its sampler, the space and how each trial trains."""
    from search.tuning import ray_adapter

    settings = ray_adapter.TrialSettings(
        max_epochs=cfg.max_epochs,
        seed=cfg.seed,
        threads=max(1, int(cfg.cpus_per_trial)),
        pretrained=cfg.pretrained_arg,
        race_epochs=cfg.race_epochs,
        models_dir=str(cfg.out_dir / "models") if cfg.keep_top > 0 else None,
        model_meta=meta,
        gpu_share=cfg.gpus_per_trial,
        checkpoint_dir=str(cfg.out_dir / CHECKPOINTS_DIR),
    )
    pretrained = bool(cfg.pretrained)
    return ray_adapter.SearchRun(
        study=study,
        storage=storage,
        space_fn=lambda t: suggest(t, space, pretrained),
        # a resumed run does not replay the same draws
        sampler=make_sampler(cfg.sampler, cfg.seed + len(study.trials)),
        n_trials=n_trials,
        settings=settings,
        resources=ray_adapter.Resources(cfg.cpus_per_trial, cfg.gpus_per_trial, concurrency),
        storage_path=str(cfg.out_dir / "ray"),
        driver=studies.driver_id(),
        grace_period=cfg.grace_period,
        reduction_factor=cfg.reduction_factor,
        asha=cfg.asha,
        promote_to=cfg.final_max_epochs if cfg.promote else 0,
        keep_top=cfg.keep_top,
        verbose=cfg.verbose,
        log_file=str(cfg.out_dir / LOG_FILE),
    )


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


def run_args(args: argparse.Namespace, argv: list[str], t_cmd: float | None = None) -> int:
    """Run the search the parsed command line asks for; the exit code. ``t_cmd``:
    ``time.monotonic()`` when the command started (default: now)."""
    t_cmd = time.monotonic() if t_cmd is None else t_cmd
    optuna.logging.set_verbosity(optuna.logging.INFO if args.verbose else optuna.logging.WARNING)
    console = Console(stderr=True, soft_wrap=True)  # no hard breaks inside paths and URLs
    # --json: stdout holds the one JSON summary; everything else goes to stderr
    out = Console(soft_wrap=True, stderr=args.json)
    ray_started = False
    try:
        _check_before_ray(args)
        from search.tuning import ray_adapter

        ray_started = True  # from here on, whatever happens, Ray is shut down at the end
        _start_ray(args, console)
        has_gpu = ray_adapter.cluster_resources().get("GPU", 0) > 0
        cfg = build_config(args, has_gpu)
        check_config(cfg)
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
        if ray_started:
            from search.tuning import ray_adapter

            ray_adapter.shutdown_ray()


def _check_before_ray(args: argparse.Namespace) -> None:
    """What can be checked in a second, before Ray's ~20 s start: the storage (a bad URL or
    file), the cache folder (a file there, a read-only HOME), the flags and a given space file
    (the defaults, which depend on the cluster's GPUs, are valid either way)."""
    studies.check_study_name(args.study)
    url = SearchConfig(storage=args.storage, studies_dir=args.studies_dir).storage_url
    studies.check_storage(url, write=True)
    cache_root_dir(args.cache_dir)
    check_config(build_config(args, has_gpu=False))
    if args.space:
        load_space(args.space)


def _start_ray(args: argparse.Namespace, console: Console) -> None:
    """Start a private Ray on this machine's CPUs and GPUs, or join the cluster asked for."""
    from search.tuning import ray_adapter

    ray_adapter.check_internals()
    if args.address is not None:
        console.print(f"joining the Ray cluster at {args.address} ...", highlight=False)
        ray_adapter.init_ray(args.address, None, None, args.verbose)
        return
    cpus, gpus = available_cpus(), torch.cuda.device_count()
    env = os.environ.get("RAY_ADDRESS")  # init_ray joins it, as Ray's scripts do
    say = f"joining the Ray cluster at {env}" if env else f"starting a private Ray ({cpus}"
    console.print(say + ("" if env else f" CPUs, {gpus} GPUs)") + " ...", highlight=False)
    ray_adapter.init_ray(None, cpus, gpus, args.verbose)
