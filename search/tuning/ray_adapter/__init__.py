"""All Ray imports of the project live in this package: Ray's API churns; its next change
touches these files alone (``cluster``: the instance; ``trial``: what runs in a trial;
``searcher``: the study kept truthful; ``run``: one search).

``run_trials`` schedules a search with Ray Tune: ``OptunaSearch`` bound to the RDB study,
``ASHAScheduler`` on the mean held-out AUC, reused actors, data in the object store once
(``tune.with_parameters``).

Fidelity is two-dimensional, epochs x folds (fold racing): a trial trains fold 0 alone for
its first ``race_epochs`` epochs, then the other folds catch up one report at a time, then all
go on in lockstep. Every report carries ``fold_epochs`` (fold-epochs trained so far), ASHA's
time attribute, so with k = 3 and race_epochs = 3 rungs at 3, 9, 27 fold-epochs mean "fold 0
at epoch 3" (every trial compared on the same fold: a paired comparison), "all folds at epoch
3", "epoch 9". Optuna's step of an intermediate value is its fold-epochs; the trial's
``intermediate_folds`` user attr maps each step to the number of folds its mean covers.

Stock Ray (2.60) records the study wrongly; ``_TruthfulSearch`` fixes it:

- ASHA's STOP skips the searcher's ``on_trial_result`` for the last result, so trials lose
  their last (sometimes only) intermediate value: we report it in ``on_trial_complete``;
- an ASHA-stopped trial is recorded COMPLETE with its early value: we record it PRUNED;
- a trial that raised gets FAIL without a reason: we store the error type and message;
- a trial stopped by the run's end (timeout, Ctrl-C) is FAIL with ``interrupted`` (re-run on
  resume), not COMPLETE with a half-trained value; COMPLETE means every fold-epoch was trained.

With a deadline (``search.tuning.deadline``) the searcher stops suggesting once a full-length trial
would not end in time, and a ``Stopper`` ends the run at the deadline.
"""

from search.tuning.ray_adapter.cluster import (
    CONNECT_TIMEOUT_S,
    ENV_PREFIX,
    LOCAL_HEALTH_CHECK,
    InternalsChanged,
    RayStartError,
    check_data_on_nodes,
    check_internals,
    check_reachable,
    cluster_resources,
    init_ray,
    shutdown_ray,
    worker_env,
)
from search.tuning.ray_adapter.run import SearchRun, run_trials
from search.tuning.ray_adapter.searcher import MACHINERY_SLACK
from search.tuning.ray_adapter.trial import (
    METRIC,
    TIME_ATTR,
    DiskFullError,
    NoCudaError,
    Resources,
    TrialSettings,
    noop_trainable,
    start_sink,
    trial_device,
)

__all__ = [
    "CONNECT_TIMEOUT_S",
    "ENV_PREFIX",
    "LOCAL_HEALTH_CHECK",
    "MACHINERY_SLACK",
    "METRIC",
    "TIME_ATTR",
    "DiskFullError",
    "InternalsChanged",
    "NoCudaError",
    "RayStartError",
    "SearchRun",
    "Resources",
    "TrialSettings",
    "check_data_on_nodes",
    "check_internals",
    "check_reachable",
    "cluster_resources",
    "init_ray",
    "noop_trainable",
    "run_trials",
    "shutdown_ray",
    "start_sink",
    "trial_device",
    "worker_env",
]
