"""``SearchConfig``: every setting of one ``pcam-search`` run, built once by the CLI.

Device-dependent defaults (``for_device``) keep ``pcam-search --trials 200`` sensible on a
2-core laptop and on a GPU box alike. The config is saved (password-free) in the study's user
attrs so refit and report use the same data, folds and epochs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_pipeline.dataset import DataConfig
from search.deadline import SEARCH_SHARE
from search.study import default_storage_url, safe_url

DEFAULT_STUDY = "pcam"
DEFAULT_STUDIES_DIR = Path("studies")  # relative to where the user runs the command


@dataclass(frozen=True)
class DeviceDefaults:
    """What changes between a CPU-only machine and one with a GPU."""

    space: str  # space file in studies/
    folds: int
    max_epochs: int
    budget_max_epochs: int  # --budget: trials are short complete runs; the winner trains long
    final_target_epochs: int  # --budget: epochs the final model's reserve is sized for
    final_max_epochs: int  # --budget: the most epochs the final model trains
    grace_period: int  # ASHA: fold-epochs every trial gets before it can be stopped
    reduction_factor: int  # ASHA eta
    race_epochs: int  # fold racing: epochs fold 0 trains alone before the others start
    cpus_per_trial: float
    gpus_per_trial: float


# CPU: k = 3, 12 epochs, fold 0 races alone for 3 epochs, so ASHA's rungs (grace 3 fold-epochs,
# eta 3) fall at 3, 9 and 27 fold-epochs = fold 0 at epoch 3, all folds at epoch 3, epoch 9;
# the winners train 12 epochs (36 fold-epochs). Epoch 1 ranks warm-up schedules wrongly
# (README, "Choosing the CPU defaults"), so the first rung is at epoch 3, on fold 0 alone.
# With --budget the trials are complete 4-epoch runs (12 fold-epochs, rungs at 3 and 9): a
# 12-epoch trial costs ~3 minutes on 2 cores, so a 5-minute search finished one (measured,
# README); the winner's params then train for as many epochs as the rest of the budget fits.
CPU_DEFAULTS = DeviceDefaults(
    "cpu",
    folds=3,
    max_epochs=12,
    budget_max_epochs=4,
    final_target_epochs=24,
    final_max_epochs=48,
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
    folds=5,
    max_epochs=24,
    budget_max_epochs=8,
    final_target_epochs=48,
    final_max_epochs=96,
    grace_period=3,
    reduction_factor=3,
    race_epochs=3,
    cpus_per_trial=2,
    gpus_per_trial=0.25,
)


def for_device(cuda: bool) -> DeviceDefaults:
    return GPU_DEFAULTS if cuda else CPU_DEFAULTS


@dataclass(frozen=True)
class SearchConfig:
    """One search run. Field comments give units and defaults (CPU / GPU)."""

    data: DataConfig = field(default_factory=DataConfig)  # patches (embedded when data=None)
    study: str = DEFAULT_STUDY  # Optuna study name
    storage: str = ""  # SQLAlchemy URL; "" = sqlite:///<studies_dir>/pcam.db
    studies_dir: Path = DEFAULT_STUDIES_DIR  # SQLite file and per-study outputs
    trials: int = 200  # finished trials wanted in the study, earlier runs included
    folds: int = 3  # k of k-fold CV (3 / 5)
    fold_strategy: str = "slide"  # slide-grouped folds; "random" only to measure the leak
    fold_seed: int = 0
    max_epochs: int = 12  # epochs of a trial that is never stopped (12 / 24)
    grace_period: int = 3  # ASHA: fold-epochs before a trial may be stopped (3 / 3)
    reduction_factor: int = 3  # ASHA eta: 1/eta of trials go on at each rung
    asha: bool = True  # False: every trial runs max_epochs (benchmarks)
    race_epochs: int = 3  # fold racing: epochs of fold 0 alone; other folds for survivors
    timeout: float | None = None  # seconds for the search; no trial starts that cannot end
    budget: float | None = None  # seconds for search + refit (submission); refit reserved
    search_share: float = SEARCH_SHARE  # --budget: least share the search gets (1: all)
    final_target_epochs: int = 24  # --budget: the final model's reserve is sized for (24 / 48)
    final_max_epochs: int = 48  # --budget: most epochs of the final model (48 / 96)
    tta: int = 8  # dihedral test views of the refit that --budget runs
    keep_top: int = 10  # COMPLETE trials whose fold models stay on disk (0 = keep none)
    cpus_per_trial: float = 1  # CPU threads per trial (1 / 2)
    gpus_per_trial: float = 0  # GPU share per trial; 0.25 = 4 trials per GPU (0 / 0.25)
    concurrency: int | None = None  # trials at once; None = as many as resources allow
    address: str | None = None  # existing Ray cluster ("auto" or host:port); None = local
    space: str = "cpu"  # space file: a path or a name in studies/ (cpu / default)
    pretrained: str | None = None  # weights: a file, or "cache" for local timm caches
    seed: int = 0  # sampler seed and training seed
    verbose: bool = False  # Ray's own logs instead of the live view
    progress: bool = True  # live view (off when not a terminal)

    @property
    def storage_url(self) -> str:
        return default_storage_url(self.storage, self.studies_dir)

    @property
    def out_dir(self) -> Path:
        """Per-study outputs (Ray's experiment folders, refit, report)."""
        return (self.studies_dir / self.study).resolve()

    @property
    def pretrained_arg(self) -> bool | str:
        """What ``models.create(pretrained=...)`` takes."""
        if self.pretrained in (None, ""):
            return False
        return True if self.pretrained == "cache" else str(self.pretrained)

    def to_dict(self) -> dict:
        """JSON-able, with the storage password masked."""
        d = asdict(self)
        d["storage"] = safe_url(self.storage_url)
        return json.loads(json.dumps(d, default=str))
