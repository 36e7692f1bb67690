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
from search.common.defaults import (  # noqa: F401  (re-exported: what callers import from here)
    CPU_DEFAULTS,
    DEFAULT_KEEP_TOP,
    DEFAULT_STUDIES_DIR,
    DEFAULT_STUDY,
    DEFAULT_TRIALS,
    DEFAULT_TTA,
    FINAL_FITS,
    FOLD_STRATEGIES,
    GPU_DEFAULTS,
    SAMPLERS,
    SEARCH_SHARE,
    DeviceDefaults,
    for_device,
)
from search.common.study import default_storage_url, safe_url

C = CPU_DEFAULTS  # the dataclass defaults below are the CPU ones (GPU: see search.common.defaults)


PRETRAINED_CACHE = "cache"  # --pretrained cache: timm's weights from the local caches only
PRETRAINED_HUB = "hub"  # --pretrained hub: downloaded into those caches first, by the driver


def weights_arg(pretrained: str | None) -> bool | str:
    """What ``models.create(pretrained=...)`` takes for a ``--pretrained`` value: False (none),
    True (the local caches: "cache", or "hub" once the driver has fetched), or a file path."""
    if not pretrained:
        return False
    return True if pretrained in (PRETRAINED_CACHE, PRETRAINED_HUB) else str(pretrained)


@dataclass(frozen=True)
class SearchConfig:
    """One search run. Defaults are the CPU ones (``search.common.defaults``: CPU and GPU)."""

    data: DataConfig = field(default_factory=DataConfig)  # patches (embedded when data=None)
    study: str = DEFAULT_STUDY  # Optuna study name
    storage: str = ""  # SQLAlchemy URL; "" = sqlite:///<studies_dir>/pcam.db
    studies_dir: Path = DEFAULT_STUDIES_DIR  # SQLite file and per-study outputs
    trials: int = DEFAULT_TRIALS  # finished trials wanted in the study, earlier runs included
    folds: int = C.folds  # k of k-fold CV
    fold_strategy: str = FOLD_STRATEGIES[0]  # slide-grouped; "random" only to measure the leak
    fold_seed: int = 0
    max_epochs: int = C.max_epochs  # epochs of a trial that is never stopped
    grace_period: int = C.grace_period  # ASHA: fold-epochs before a trial may be stopped
    reduction_factor: int = C.reduction_factor  # ASHA eta: 1/eta of trials go on at each rung
    asha: bool = True  # False: every trial runs max_epochs (benchmarks)
    # the growing top rung (search.tuning.ladder): the best params train again as trials of
    # 2x, 4x .. max_epochs up to final_max_epochs; off under a deadline (short trials there)
    promote: bool = True
    race_epochs: int = C.race_epochs  # fold racing: epochs of fold 0 alone, then the others
    timeout: float | None = None  # seconds for the search; no trial starts that cannot end
    budget: float | None = None  # seconds for search + refit (submission); refit reserved
    search_share: float = SEARCH_SHARE  # --budget: least share the search gets (1: all)
    final_target_epochs: int = C.final_target_epochs  # --budget: the final model's reserve
    final_max_epochs: int = C.final_max_epochs  # --budget: most epochs of one final model
    final_seed_epochs: int = C.final_seed_epochs  # --budget: more seeds once each gets this
    final_fit: str = FINAL_FITS[0]  # --budget: "full" (every labelled row) or "folds" (k models)
    tta: int = DEFAULT_TTA  # dihedral test views of the refit that --budget runs
    keep_top: int = DEFAULT_KEEP_TOP  # COMPLETE trials whose fold models stay (0: none)
    cpus_per_trial: float = C.cpus_per_trial  # CPU threads per trial
    gpus_per_trial: float = C.gpus_per_trial  # GPU share per trial; 0.25 = 4 trials per GPU
    concurrency: int | None = None  # trials at once; None = as many as resources allow
    address: str | None = None  # existing Ray cluster ("auto" or host:port); None = local
    space: str = C.space  # space file: a path or a name in studies/
    pretrained: str | None = None  # weights: a file, "cache" (local timm caches) or "hub"
    # (fetched into those caches once, by the driver)
    sampler: str = SAMPLERS[0]  # Optuna TPE: "tpe" (independent) or "tpe-multivariate"
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
        return weights_arg(self.pretrained)

    def to_dict(self) -> dict:
        """JSON-able, with the storage password masked."""
        d = asdict(self)
        d["storage"] = safe_url(self.storage_url)
        return json.loads(json.dumps(d, default=str))
