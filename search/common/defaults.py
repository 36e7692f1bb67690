"""Every default a command shows in its help, defined once, with no third-party imports.

The CLIs' parsers (``search.commands.search_args``) read only this module, so ``pcam-search
--help`` and argument errors answer without importing torch, Ray or Optuna;
``search.common.config`` builds the run's ``SearchConfig`` from the same values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data_pipeline.constants import FOLD_SEED, FOLDS_CPU, FOLDS_GPU  # noqa: F401
from data_pipeline.constants import STRATEGIES as FOLD_STRATEGIES  # noqa: F401

DEFAULT_STUDY = "pcam"
DEFAULT_STUDIES_DIR = Path("studies")  # relative to where the user runs the command
DEFAULT_TRIALS = 200  # finished trials wanted in the study, earlier runs included
DEFAULT_KEEP_TOP = 10  # COMPLETE trials whose fold models stay on disk
DEFAULT_TTA = 8  # dihedral test views of a submission
# --budget: the least share of the budget the search gets; the final model's reserve (to
# train its target epochs at the observed pace) takes at most the rest
SEARCH_SHARE = 0.25
# --budget: the least budget accepted. Starting torch, Ray and the data takes 20-40 s on 2
# cores before the first trial, and the final model and the predictions need their share
MIN_BUDGET_S = 60.0
# --budget: what the final model is. "full": the best params trained on every labelled row
# (one model, or more seeds once one has its cap of epochs); "folds": k fold models. At one
# cost a full-data model trains 2x the epochs of k = 3 fold models on 1.5x the
# rows each: measured better on every generator setting (docs/benchmarks.md, "The final
# model")
FINAL_FITS = ("full", "folds")
# Optuna's TPE over the conditional space: "tpe" samples each parameter on its own;
# "tpe-multivariate" models them jointly within groups of trials that share parameters
# (Optuna's advice for conditional spaces). Both use constant_liar for parallel trials.
SAMPLERS = ("tpe", "tpe-multivariate")


@dataclass(frozen=True)
class DeviceDefaults:
    """What changes between a CPU-only machine and one with a GPU."""

    space: str  # space file in studies/
    folds: int
    max_epochs: int
    # --budget / --timeout: trials are short complete runs; the winner trains long after
    budget_max_epochs: int
    final_target_epochs: int  # --budget: epochs the final model's reserve is sized for
    final_max_epochs: int  # --budget: the most epochs one final model trains
    final_seed_epochs: int  # --budget, full fit: a 2nd (3rd) seed once each gets this many
    grace_period: int  # ASHA: fold-epochs every trial gets before it can be stopped
    reduction_factor: int  # ASHA eta
    race_epochs: int  # fold racing: epochs fold 0 trains alone before the others start
    cpus_per_trial: float
    gpus_per_trial: float


# --budget's full-data final model trains epochs first: a second seed comes only once each of
# two gets final_seed_epochs. Measured at equal compute (benchmarks/final_model.py, recipe): 1
# model x 48 epochs against 2 x 24: +0.023 stain, +0.012 hard, -0.004 embedded
# (docs/benchmarks.md, "The final model"), so on CPU seeds wait for the 48-epoch cap. GPU:
# the same rule, unmeasured.
# CPU: k = 3, 12 epochs, fold 0 races alone for 3 epochs, so ASHA's rungs (grace 3 fold-epochs,
# eta 3) fall at 3, 9 and 27 fold-epochs = fold 0 at epoch 3, all folds at epoch 3, epoch 9;
# the winners train 12 epochs (36 fold-epochs). Epoch 1 ranks warm-up schedules wrongly
# (docs/benchmarks.md, "Fold racing and the first rung"), so the first rung is at epoch 3, on
# fold 0 alone.
# With --budget or --timeout the trials are complete 4-epoch runs (12 fold-epochs, rungs at 3
# and 9): a 12-epoch trial costs ~3 minutes on 2 cores, so a 5-minute search finished one
# (measured); the winner's params then train for as many epochs as the final model's time
# fits (--budget's last step, or pcam-refit --best --time).
CPU_DEFAULTS = DeviceDefaults(
    "cpu",
    folds=FOLDS_CPU,
    max_epochs=12,
    budget_max_epochs=4,
    final_target_epochs=24,
    final_max_epochs=48,
    final_seed_epochs=48,
    grace_period=3,
    reduction_factor=3,
    race_epochs=3,
    cpus_per_trial=1,
    gpus_per_trial=0,
)
# GPU: k = 5, 24 epochs (120 fold-epochs): rungs at 3, 9, 27 and 81 fold-epochs = fold 0 at
# epoch 3, folds 0-2 at epoch 3, then epochs 6 and 17. 4 trials share a GPU: a 96x96 ResNet
# trial rarely fills an H100 on its own.
GPU_DEFAULTS = DeviceDefaults(
    "default",
    folds=FOLDS_GPU,
    max_epochs=24,
    budget_max_epochs=8,
    final_target_epochs=48,
    final_max_epochs=96,
    final_seed_epochs=96,
    grace_period=3,
    reduction_factor=3,
    race_epochs=3,
    cpus_per_trial=2,
    gpus_per_trial=0.25,
)


def for_device(cuda: bool) -> DeviceDefaults:
    return GPU_DEFAULTS if cuda else CPU_DEFAULTS


def cpu_gpu(name: str) -> str:
    """'CPU x, GPU y' for a ``DeviceDefaults`` field: what help strings say."""
    return f"CPU {getattr(CPU_DEFAULTS, name)}, GPU {getattr(GPU_DEFAULTS, name)}"
