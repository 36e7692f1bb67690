"""The study's and trials' user-attr keys: written by the search and the refit, read by the
refit, the report, resume and the benchmarks. One definition each, so a rename touches one
line. (optuna-dashboard shows them as they are named here.)"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # optuna only for the types: this module is imported by light CLIs
    import optuna

# --- study attrs (search.commands.search_study.record_study, search.submission.refit*) ---
DATASET_FINGERPRINT = "dataset_fingerprint"  # content hash of the data searched on
FOLDS_FILE = "folds_file"  # the cache's folds CSV every trial and refit used
CONFIG = "config"  # the last run's SearchConfig.to_dict() (password masked)
SPACE = "space"  # the search space, as Space.to_dict()
VERSION = "version"  # pcam-search package version
RUNS = "runs"  # the last 50 command lines that ran this study
COMMAND = "command"  # the last command line
REFIT = "refit"  # the latest refit's record (refit.json)

# --- trial attrs (search.tuning.ray_adapter) ---
DRIVER = "driver"  # host:pid of the driver that ran it (resume: is it still alive?)
RAY_TRIAL_ID = "ray_trial_id"
INTERMEDIATE_FOLDS = "intermediate_folds"  # {step: folds the step's mean averages}
LOSS_CURVE = "loss_curve"  # {step: [mean train loss, mean held-out loss]}
EPOCHS_RUN = "epochs_run"
FOLD_EPOCHS = "fold_epochs"  # fold-epochs trained (ASHA's clock)
AUC_FOLDS = "auc_folds"  # held-out AUC per fold at the last epoch
SECONDS = "seconds"  # training seconds of the trial
DEVICE = "device"  # what it trained on (a GPU's name, or "cpu")
PRECISION = "precision"  # bf16 / fp16 autocast or fp32 (search.training.engine.precision)
POOL = "pool"  # where a COMPLETE trial's patches were: "device" or "host" (and why)
NODE = "node"  # the Ray node's host
VAL_LOSS = "val_loss"  # mean held-out loss at the last epoch
IMAGES_PER_S = "images_per_s"  # training throughput
EARLY_STOPPED = "early_stopped"  # early stopping (patience) ended every fold: COMPLETE
MODELS_DIR = "models_dir"  # its kept fold models (--keep-top), while kept
INTERRUPTED = "interrupted"  # stopped by a deadline or Ctrl-C: re-run on resume
RETRY_OF = "retry_of"  # the interrupted trial whose params this one re-runs (its number)
TRIAL_EPOCHS = "trial_epochs"  # a promoted trial's schedule length (others: the study's)
PROMOTED_FROM = "promoted_from"  # the shorter COMPLETE trial whose params it trains longer
RESUMED_FROM = "resumed_from"  # fold-epochs it continued from (the interrupted one's checkpoint)
FAIL_REASON = "fail_reason"
ERROR_TYPE = "error_type"
ERROR_MESSAGE = "error_message"

# The big records (the run's config, the space, the runs, the refit) live in the study's
# *system* attrs: the same database, so on a cluster or with PostgreSQL they travel with the
# study, while the user attrs stay a few short fields (``optuna studies`` printed one
# 2,824-character row; optuna-dashboard lists every user attr). The study's ``refit`` user
# attr is a summary pointing to refit.json. Studies written before read from the user attrs.
RECORD_PREFIX = "pcam:"
REFIT_SUMMARY = ("kind", "trial", "oof_auc", "test_auc", "full_fit", "record")


def set_record(study: optuna.Study, key: str, value: Any) -> None:
    """Store a big JSON record of ``study`` under ``key`` (see above)."""
    study._storage.set_study_system_attr(study._study_id, RECORD_PREFIX + key, value)


def get_record(study: optuna.Study, key: str, default: Any = None) -> Any:
    """The record ``key`` of ``study``: its system attr, else (older studies, in-memory test
    studies) its user attr of that name, else ``default``."""
    sys_attrs = study._storage.get_study_system_attrs(study._study_id)
    if RECORD_PREFIX + key in sys_attrs:
        return sys_attrs[RECORD_PREFIX + key]
    return study.user_attrs.get(key, default)


def set_refit(study: optuna.Study, record: dict, path: Path | str) -> None:
    """The refit's full record as a system attr; its summary (and where refit.json lies) as
    the short ``refit`` user attr that optuna-dashboard shows."""
    set_record(study, REFIT, record)
    summary = {k: record.get(k) for k in REFIT_SUMMARY if record.get(k) is not None}
    study.set_user_attr(REFIT, {**summary, "record": str(path)})
