"""``pcam-search``'s study: opened (or resumed with its frozen settings), recorded with the
run's config, and summed up at the end (console, ``--json``, the next commands)."""

from __future__ import annotations

import importlib.metadata
import shlex
import time
import warnings
from dataclasses import replace

import optuna
from rich.console import Console

from data_pipeline.cli_common import EXIT_FAILED
from search.commands.search_config import FROZEN_SETTINGS, safe_argv
from search.common import study as studies
from search.common.attrs import (
    AUC_FOLDS,
    COMMAND,
    CONFIG,
    DATASET_FINGERPRINT,
    FOLDS_FILE,
    PROMOTED_FROM,
    REFIT,
    RUNS,
    SPACE,
    VERSION,
    get_record,
    set_record,
)
from search.common.cli_args import print_error, study_flags
from search.common.config import SearchConfig
from search.tuning.ladder import epochs_of
from search.tuning.progress import Tally
from search.tuning.space import Space

METRIC_NAME = "mean fold AUC"  # what a trial's value is, as optuna-dashboard labels it


def open_study(
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


def resume_settings(
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


def record_study(
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


def print_summary(console: Console, study: optuna.Study, cfg: SearchConfig, tally: Tally) -> None:
    counts = studies.tally(study)
    console.print(
        f"study [bold]{cfg.study}[/] in {studies.safe_url(cfg.storage_url)}: "
        + ", ".join(f"{k.lower()} {v}" for k, v in sorted(counts.items()))
        + f"  (this run: {tally.finished} finished, {tally.fold_epochs} fold-epochs trained)"
    )
    best = studies.best_trial(study)
    if best is not None:
        folds = best.user_attrs.get(AUC_FOLDS, [])
        source = best.user_attrs.get(PROMOTED_FROM)
        length = f"{epochs_of(best, cfg.max_epochs)} epochs" + (
            f", the params of trial {source} trained longer" if source is not None else ""
        )
        console.print(
            f"best mean {cfg.folds}-fold AUC [bold green]{best.value:.4f}[/] "
            f"(trial {best.number}, {length}; folds {', '.join(f'{a:.4f}' for a in folds)})"
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


def no_result(console: Console, study: optuna.Study) -> int:
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
