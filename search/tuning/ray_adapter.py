"""All Ray imports of the project live here: Ray's API churns; its next change touches one file.

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

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import optuna
import ray
import torch
from optuna.trial import TrialState
from ray import cloudpickle, tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from search.common.attrs import (
    AUC_FOLDS,
    DEVICE,
    DRIVER,
    EPOCHS_RUN,
    FOLD_EPOCHS,
    IMAGES_PER_S,
    INTERMEDIATE_FOLDS,
    INTERRUPTED,
    LOSS_CURVE,
    MODELS_DIR,
    NODE,
    POOL,
    PRECISION,
    RAY_TRIAL_ID,
    SECONDS,
    VAL_LOSS,
)
from search.common.ensemble import ensemble_files, model_meta, write_files
from search.common.study import value_of
from search.training.engine import PoolImages, TrainData, TrainParams, precision, train_cv
from search.training.results import CVResult
from search.tuning.deadline import Deadline
from search.tuning.outcome import STOPS_THE_RUN, WORKER_GONE, TrialError, classify
from search.tuning.progress import Tally

MACHINERY_SLACK = 8  # trials Ray may create beyond --trials to replace interrupted ones
METRIC = "auc"  # mean held-out AUC over the folds trained so far (all k after epoch 1)
TIME_ATTR = "fold_epochs"  # ASHA's clock: fold-epochs trained (racing makes it != epochs)
NODE_CHECK_S = 120  # check_data_on_nodes: a node whose worker has not answered by then fails


@dataclass(frozen=True)
class TrialSettings:
    """What every trial needs besides its params (goes to trials by ``with_parameters``)."""

    max_epochs: int
    seed: int
    threads: int  # torch CPU threads
    pretrained: bool | str
    race_epochs: int = 3  # fold racing: fold 0 alone for this many epochs (0: lockstep)
    models_dir: str | None = None  # COMPLETE trials save their fold models + OOF here
    model_meta: dict | None = None  # saved with them: dataset fingerprint, folds file, ...
    # run_trials sets it: the actor that writes them on the driver's node (see ModelSink)
    sink: Any = None  # the driver-side actor (ray.actor.ActorHandle) that writes fold models
    gpu_share: float = 0.0  # --gpus-per-trial: the share of its GPU a trial plans memory with


@dataclass(frozen=True)
class Resources:
    cpus_per_trial: float
    gpus_per_trial: float
    concurrency: int


def _trainable(config: dict, data: TrainData, folds: np.ndarray, settings: TrialSettings) -> None:
    """One trial: train the k fold models (racing), report the mean fold AUC every step.

    A trial that trains to the end (or stops itself by patience) saves its fold models and
    out-of-fold probabilities before its last report, so the searcher can record where.
    """
    node = ray.get_runtime_context().get_node_id()[:12]
    device = trial_device(ray.get_gpu_ids(), torch.cuda.is_available(), node)
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    arithmetic = precision(device)  # once per trial, not per report
    full = settings.max_epochs * (int(np.max(folds)) + 1)
    keep = settings.models_dir is not None
    last: dict = {}

    def report(epoch: int, m: dict) -> bool:
        result = {
            METRIC: m["auc"],
            "epoch": epoch,
            TIME_ATTR: m["fold_epochs"],
            "folds": m["folds"],
            "auc_folds": m["auc_folds"],
            "val_loss": m["val_loss"],
            "train_loss": m["train_loss"],
            "acc": m["acc"],
            "trial_seconds": m["seconds"],
            "images_per_s": m["train_images_per_s"],
            "device": device_name,
            "precision": arithmetic,
            "self_stopped": bool(m.get("self_stopped", False)),
            "node": node,
        }
        if keep and (m["fold_epochs"] >= full or result["self_stopped"]):
            last.update(result)  # the last report: after the models are saved
        else:
            tune.report(result)
        return False  # stopping is ASHA's call: Ray ends this thread at the next report

    res = train_cv(
        config,
        data,
        folds,
        epochs=settings.max_epochs,
        device=device,
        seed=settings.seed,
        threads=settings.threads,
        pretrained=settings.pretrained,
        on_epoch=report,
        race_epochs=settings.race_epochs,
        keep_states=keep,
        keep_oof=keep,
        gpu_share=settings.gpu_share or 1.0,
    )
    if last:
        last["models"] = _save_models(config, res, settings, tune.get_context().get_trial_id())
        last["pool"] = res.pool + (f" ({res.pool_note})" if res.pool_note else "")
        tune.report(last)


class DiskFullError(OSError):
    """The disk that keeps the fold models (and the study) is full: the search stops."""


class NoCudaError(RuntimeError):
    """Ray gave a trial a GPU, but torch in that worker finds no CUDA device."""


def trial_device(gpu_ids: list, cuda_available: bool, node: str) -> str:
    """The device a trial trains on: "cuda" when Ray gave it a GPU, else "cpu". A GPU given
    where torch sees none (a CPU build of torch, a driver problem, a logical GPU declared
    with ``ray start --num-gpus``) is an error naming the node: silently training on its CPU
    would take the GPU's schedule and make every number wrong."""
    if not gpu_ids:
        return "cpu"
    if cuda_available:
        return "cuda"
    raise NoCudaError(
        f"Ray gave this trial GPU {list(gpu_ids)} on node {node} ({socket.gethostname()}), "
        f"but torch {torch.__version__} there finds no CUDA device (CUDA build: "
        f"{torch.version.cuda or 'none'}, CUDA_VISIBLE_DEVICES="
        f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}); install a CUDA build of torch on "
        "that node, or run with --gpus-per-trial 0"
    )


class ModelSink:
    """Writes the kept fold models under ``models_dir`` on the driver's node (a Ray actor).

    A trial may run on any node of a cluster; its files travel to this actor whole, as bytes
    through Ray's object store, and are written atomically where the driver (and pcam-refit)
    reads them. So the models folder needs no filesystem shared by the nodes: Ray >= 2.7 no
    longer syncs trial folders to the head node (checkpoints need NFS or cloud storage), and
    Optuna's artifact store needs a store every worker can reach (a file store on the driver's
    disk is not). The study database gets only the folder's path.
    """

    def __init__(self, models_dir: str) -> None:
        self.models_dir = Path(models_dir)

    def put(self, trial_id: str, files: dict) -> str:
        """Write one trial's ``{name: bytes}`` as ``models_dir/<trial_id>``; its path."""
        if Path(trial_id).name != trial_id:
            raise ValueError(f"bad trial id {trial_id!r}")
        return str(write_files(self.models_dir / trial_id, files))


def start_sink(models_dir: str) -> Any:
    """A ``ModelSink`` actor pinned to this (the driver's) node, using no CPU."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    actor = ray.remote(num_cpus=0)(ModelSink)
    return actor.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False)
    ).remote(models_dir)


def _save_models(config: dict, res: CVResult, settings: TrialSettings, trial_id: str) -> str:
    """Fold weights + OOF of a finished trial, atomically, in ``models_dir/<ray trial id>`` on
    the driver's node (through ``settings.sink``; written here when there is none)."""
    p = TrainParams.from_dict(config)
    assert res.states is not None  # train_cv(keep_states=True) for a kept trial
    meta = {
        **(settings.model_meta or {}),
        **model_meta(p),
        "epochs": settings.max_epochs,
        "k": len(res.states),
        "device": res.device,
        "ray_trial_id": trial_id,
    }
    files = ensemble_files(res.states, meta, oof=res.oof_best if p.restore_best else res.oof)
    try:
        if settings.sink is None:
            assert settings.models_dir is not None  # only called when models are kept
            return str(write_files(Path(settings.models_dir) / trial_id, files))
        return ray.get(settings.sink.put.remote(trial_id, files))
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        size = sum(len(b) for b in files.values()) / 1e6
        raise DiskFullError(
            f"no space left on the disk of {settings.models_dir} to keep a trial's fold models "
            f"({size:.1f} MB); free space there (or --keep-top 0: keep none) and run the same "
            "command again"
        ) from None


def noop_trainable(
    config: dict, data: TrainData, folds: np.ndarray, settings: TrialSettings
) -> None:
    """No training: reports ``max_epochs`` made-up AUCs (a smooth function of lr) at once.

    For measuring orchestration overhead per trial (``benchmarks/search_overhead.py``).
    """
    base = 0.9 - 0.05 * abs(math.log10(float(config.get("lr", 1e-3))) + 3)
    k = int(np.max(folds)) + 1
    for epoch in range(1, settings.max_epochs + 1):
        tune.report(
            {
                METRIC: base + 0.01 * epoch,
                "epoch": epoch,
                TIME_ATTR: epoch * k,
                "folds": k,
                "auc_folds": [base] * k,
            }
        )


class _RecordingASHA(ASHAScheduler):
    """ASHA that remembers which trials it stopped before their last epoch."""

    def __init__(self, stopped: set[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stopped_early = stopped

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP and result.get(TIME_ATTR, 0) < self._max_t:
            self.stopped_early.add(trial.trial_id)
        return decision


class _DeadlineStopper(tune.Stopper):
    """Stops a trial as soon as its own pace says it cannot finish before the deadline (its
    worker is better spent on one that can), and the whole run when the deadline passes or
    the tally says the run cannot go on (a full disk). Either way the trials are recorded as
    interrupted (re-run on resume)."""

    def __init__(self, deadline: Deadline, t0: float, tally: Tally) -> None:
        self.deadline, self.t0, self.tally = deadline, t0, tally

    def __call__(self, trial_id: str, result: dict) -> bool:
        if self.tally.halted:
            return True
        done, seconds = int(result.get(TIME_ATTR, 0)), float(result.get("trial_seconds", 0.0))
        if not self.deadline.should_cut(time.monotonic() - self.t0, done, seconds, trial_id):
            return False
        self.deadline.cut.add(trial_id)
        return True

    def stop_all(self) -> bool:
        return bool(self.tally.halted) or self.deadline.stop_all(time.monotonic() - self.t0)


class _TrialRegistry(tune.Callback):
    """Keeps each Ray trial object (its error file) where the searcher can reach it."""

    def __init__(self) -> None:
        self.trials: dict = {}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.trials[trial.trial_id] = trial


def _finite(v: float | None) -> float | None:
    """A loss for JSON user attrs: None when missing or not finite (JSON has no NaN)."""
    v = None if v is None else float(v)
    return v if v is not None and math.isfinite(v) else None


def _error_of(trial: Any) -> TrialError:
    """The exception that ended a Ray trial (type name, message, module).

    Read from the trial's local error files (written by Ray before the searcher hears of the
    failure; ``Trial.get_pickled_error`` reads the synced copy, which is not there yet).
    """
    exc = None
    path = getattr(trial, "pickled_error_file", None)
    if path and os.path.isfile(path):
        try:
            with open(path, "rb") as f:
                exc = cloudpickle.load(f)
        except Exception:  # an error class that cannot be rebuilt here: use the text file
            exc = None
    if exc is not None:
        # RayTaskError wraps the trainable's own error; Ray's other errors are the machinery's
        task_error = isinstance(exc, ray.exceptions.RayTaskError)
        cause = getattr(exc, "cause", None) if task_error else None
        cause = cause if isinstance(cause, BaseException) else exc
        kind = type(cause)
        return TrialError(kind.__name__, str(cause).strip()[:2000], kind.__module__)
    text_path = getattr(trial, "error_file", None)
    if text_path and os.path.isfile(text_path):
        with open(text_path) as f:
            lines = [ln for ln in f.read().splitlines() if ln.strip()]
        if lines:  # last line of the traceback: "pkg.mod.ErrorType: message"
            head, _, msg = lines[-1].partition(": ")
            module, _, name = head.rpartition(".")
            return TrialError(name, msg[:2000], module)
    return TrialError(WORKER_GONE, "the trial's worker failed without a recorded error")


class _TruthfulSearch(OptunaSearch):
    """OptunaSearch whose study says what happened (see the module docstring)."""

    def __init__(
        self,
        *,
        max_epochs: int,
        full_fold_epochs: int,
        deadline: Deadline,
        t0: float,
        stopped_early: set[str],
        registry: _TrialRegistry,
        tally: Tally,
        driver: dict,
        keep_top: int = 10,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._keep_top = keep_top
        # COMPLETE trials whose fold models are on disk: path -> value (earlier runs included)
        self._kept: dict[str, float] = {
            t.user_attrs[MODELS_DIR]: value_of(t)
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.user_attrs.get(MODELS_DIR)
        }
        self._max_epochs = max_epochs
        self._full = full_fold_epochs
        self._deadline, self._t0 = deadline, t0
        self._best_value = -math.inf
        self._folds_at: dict[str, dict[str, int]] = {}  # trial -> {step: folds averaged}
        self._losses: dict[str, dict[str, list]] = {}  # trial -> {step: [train, val] loss}
        self._stopped_early = stopped_early
        self._registry = registry
        self._tally = tally
        self._driver = driver
        self._reported: dict[str, set[int]] = {}
        self.interrupted_reason = "the search stopped before the trial finished"

    def __getstate__(self) -> dict:
        # Ray pickles the searcher into its experiment folder (tuner.pkl). The storage holds the
        # database URL, password included: keep it out. Nothing restores from that pickle.
        return {"_metric": self._metric, "_mode": self._mode}

    def save(self, checkpoint_path: str) -> None:
        """No Ray-side searcher checkpoint: the RDB study is the state, and resume reads it."""

    def restore(self, checkpoint_path: str) -> None:
        """See ``save``."""

    @property
    def study(self) -> optuna.Study:
        """OptunaSearch's study (set from ``storage`` + ``study_name`` in its constructor)."""
        return cast(optuna.Study, self._ot_study)

    # Ray's searchers end a search by returning Searcher.FINISHED, a str, from suggest
    def suggest(self, trial_id: str) -> dict | str | None:  # type: ignore[override]
        # --trials counts finished trials: an interrupted one (a worker that died) is replaced
        if self._tally.finished >= self._tally.target:
            return self.FINISHED
        if self._tally.finished + len(self._tally.running) >= self._tally.target:
            return None  # enough are running; ask again when one ends (it may be interrupted)
        guard = self._deadline.needs_guard()
        if not self._deadline.may_start(time.monotonic() - self._t0):
            self._deadline.not_started += 1
            self._deadline.reached = True
            return self.FINISHED  # Ray starts no further trial and lets running ones end
        config = super().suggest(trial_id)
        if not isinstance(config, dict):
            return config
        if guard:
            self._deadline.guard = trial_id
        ot = self._ot_trials[trial_id]
        ot.set_user_attr(DRIVER, self._driver)
        ot.set_user_attr(RAY_TRIAL_ID, trial_id)
        self._reported[trial_id] = set()
        self._tally.running[ot.number] = 0
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        ot = self._ot_trials.get(trial_id)
        if ot is None or trial_id in self._completed_trials or METRIC not in result:
            return
        step = int(result.get(TIME_ATTR, result["epoch"]))
        if step in self._reported[trial_id]:
            return
        self._tally.fold_epochs += step - max(self._reported[trial_id], default=0)
        self._reported[trial_id].add(step)
        value = float(result[METRIC])
        if math.isfinite(value):  # Optuna rejects NaN intermediate values
            ot.report(value, step)
            # a step's value averages this many folds: 1, 2, .., k while racing, then k
            folds_at = self._folds_at.setdefault(trial_id, {})
            folds_at[str(step)] = int(result.get("folds", 0))
            ot.set_user_attr(INTERMEDIATE_FOLDS, folds_at)
            # the report's loss curves: mean train and held-out loss of the folds so far
            losses = self._losses.setdefault(trial_id, {})
            losses[str(step)] = [_finite(result.get(k)) for k in ("train_loss", "val_loss")]
            ot.set_user_attr(LOSS_CURVE, losses)
        self._deadline.observe(
            trial_id,
            float(result.get("trial_seconds", 0.0)),
            step,
            float(result.get("images_per_s", 0.0)),
        )
        self._tally.running[ot.number] = int(result["epoch"])

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        ot = self._ot_trials.get(trial_id)
        if ot is None or trial_id in self._completed_trials:
            return
        if result and METRIC in result:
            self.on_trial_result(trial_id, result)  # ASHA's STOP skipped it: the last epoch
        self._completed_trials.add(trial_id)
        epochs = int(result["epoch"]) if result and "epoch" in result else 0
        fold_epochs = max(self._reported.get(trial_id, ()), default=0)
        attrs: dict = {EPOCHS_RUN: epochs, FOLD_EPOCHS: fold_epochs}
        if result and METRIC in result:
            attrs.update(
                {
                    AUC_FOLDS: [float(a) for a in result.get("auc_folds", [])],
                    SECONDS: round(float(result.get("trial_seconds", 0.0)), 2),
                    DEVICE: result.get("device", ""),
                    PRECISION: result.get("precision", ""),
                    NODE: result.get("node", ""),
                    VAL_LOSS: float(result.get("val_loss", float("nan"))),
                    IMAGES_PER_S: round(float(result.get("images_per_s", 0.0)), 1),
                }
            )
            if result.get("pool"):
                attrs[POOL] = result["pool"]
        value = float(result[METRIC]) if result and METRIC in result else float("nan")
        err = _error_of(self._registry.trials.get(trial_id)) if error else None
        if err is not None and err.type in STOPS_THE_RUN:
            self._tally.halted = err.message  # the stopper ends the run at once
        outcome = classify(
            fold_epochs=fold_epochs,
            full_fold_epochs=self._full,
            value=value,
            error=err,
            self_stopped=bool(result and result.get("self_stopped")),
            pruned=trial_id in self._stopped_early,
            cut_by_deadline=trial_id in self._deadline.cut,
            stop_reason=self.interrupted_reason,
        )
        attrs.update(outcome.attrs)
        state, error_text = TrialState[outcome.state], outcome.error_text
        if outcome.interrupted:
            self._tally.wasted += fold_epochs
        if state == TrialState.COMPLETE and value > self._best_value:
            self._best_value, self._deadline.best = value, trial_id
        self._deadline.finished(trial_id, state == TrialState.COMPLETE)
        if result and result.get("models"):
            if state == TrialState.COMPLETE:
                attrs[MODELS_DIR] = result["models"]
            self._keep(result["models"], value if state == TrialState.COMPLETE else None)
        self._tally.record(
            ot.number,
            "INTERRUPTED" if attrs.get(INTERRUPTED) else state.name,
            value if math.isfinite(value) else None,
            ot.params,
            epochs,
            error_text,
        )
        try:
            for k, v in attrs.items():
                ot.set_user_attr(k, v)
            self.study.tell(ot, value if state == TrialState.COMPLETE else None, state=state)
        except Exception as e:  # never lose the search over one bookkeeping write
            logging.getLogger(__name__).warning("could not record trial %s: %s", ot.number, e)

    def _keep(self, path: str, value: float | None) -> None:
        """Keep the fold models of the ``keep_top`` best COMPLETE trials; delete the rest."""
        if value is not None and math.isfinite(value):
            self._kept[path] = value
        else:
            shutil.rmtree(path, ignore_errors=True)
        ranked = sorted(self._kept, key=self._kept.__getitem__, reverse=True)
        for old in ranked[self._keep_top :]:
            shutil.rmtree(old, ignore_errors=True)
            del self._kept[old]

    @property
    def kept(self) -> dict[str, float]:
        """Saved fold models of the best COMPLETE trials: folder -> value."""
        return dict(self._kept)

    def close_open_trials(self, reason: str) -> int:
        """FAIL (interrupted) every trial asked but not finished, e.g. after Ctrl-C."""
        n = 0
        for trial_id in list(self._ot_trials):
            if trial_id not in self._completed_trials:
                self.interrupted_reason = reason
                self.on_trial_complete(trial_id, None)
                n += 1
        return n


def init_ray(
    address: str | None, num_cpus: int | None, num_gpus: int | None, verbose: bool
) -> dict:
    """Start a private Ray instance, or join the cluster at ``address``.

    Returns the cluster's resources ({"CPU": n, "GPU": m, ...}).
    """
    # Before ray.init: no per-trial CSV/JSON/TensorBoard writers (we log to Optuna). Pending
    # trials (RUNNING in the study before they run) are bounded by max_concurrent_trials; a
    # TUNE_MAX_PENDING_TRIALS_PG of 1 was measured to serialise trials on a 2-node cluster.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "0")
    if not verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the old reporter honours verbose=0
    kwargs: dict = dict(
        include_dashboard=False,
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.ERROR,
        ignore_reinit_error=True,
    )
    # As in Ray's own scripts, RAY_ADDRESS joins a cluster too. Without either, "local" starts
    # a private instance: plain ray.init() would silently join any `ray start` cluster running
    # on this machine (and then refuse num_cpus).
    address = address or os.environ.get("RAY_ADDRESS")
    # the project's settings (PCAM_AMP, ...) reach every worker, on every node: a cluster's
    # workers are started by its raylets, not from this process's environment
    forwarded = worker_env(os.environ)
    if forwarded:
        kwargs["runtime_env"] = {"env_vars": forwarded}
    if address:
        check_reachable(address)
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            # a loaded machine must not declare its own node dead: the GCS marks a raylet
            # dead after health_check_failure_threshold missed checks (Ray's default: 5 x 3 s
            # periods; seen on 2 cores beside two heavy jobs). Here ~5 minutes of silence.
            kwargs["_system_config"] = LOCAL_HEALTH_CHECK
            ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, **kwargs)
    except Exception as e:  # noqa: BLE001 - whatever Ray raised: said in one line, with hints
        raise RayStartError(_start_failure(e, address)) from e
    return ray.cluster_resources()


LOCAL_HEALTH_CHECK = {
    "health_check_period_ms": 10_000,
    "health_check_timeout_ms": 30_000,
    "health_check_failure_threshold": 30,
}


class RayStartError(RuntimeError):
    """Ray did not start (or join): the one-line reason and what to try."""


def _start_failure(e: Exception, address: str | None) -> str:
    """What failed when Ray did not start, and what to try."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    where = f"joining the Ray cluster at {address}" if address else "starting a private Ray"
    hints = []
    home = Path.home()
    if not os.access(home, os.W_OK):
        hints.append(
            f"HOME ({home}) cannot be written and Ray keeps its token in ~/.ray: set HOME to "
            "a writable folder, or RAY_AUTH_TOKEN_PATH to a writable file"
        )
    tmp = Path(os.environ.get("RAY_TMPDIR", "/tmp"))
    if not os.access(tmp, os.W_OK):
        hints.append(f"{tmp} cannot be written: set RAY_TMPDIR to a writable folder")
    hints.append("`ray stop --force` ends a stale Ray instance of this user")
    return f"{where} failed ({type(e).__name__}: {first}); " + "; ".join(hints)


class InternalsChanged(RuntimeError):
    """A private attribute of Ray Tune or Optuna the adapter needs is gone (an upgrade)."""


def check_internals() -> None:
    """``InternalsChanged`` naming the attribute when a private one the project needs is
    missing. No public API gives them: the searcher's trial map and study (``_ot_trials``,
    ``_ot_study``, ``_completed_trials``: the study is recorded truthfully through them),
    ASHA's ``_max_t`` (a STOP below it is PRUNED), and Optuna's storage handle (study system
    attrs, closing a dead driver's trials). Checked before every search, so a Ray or Optuna
    release that renames one fails at once instead of recording a wrong study."""
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    study.enqueue_trial({})
    trial = study.trials[0]
    objects = {
        "ray.tune.search.optuna.OptunaSearch": (
            OptunaSearch(metric=METRIC, mode="max"),
            ("_ot_trials", "_ot_study", "_completed_trials"),
        ),
        "ray.tune.schedulers.ASHAScheduler": (
            ASHAScheduler(time_attr=TIME_ATTR, metric=METRIC, mode="max", max_t=3),
            ("_max_t",),
        ),
        "optuna.study.Study": (study, ("_storage", "_study_id")),
        "optuna.trial.FrozenTrial": (trial, ("_trial_id",)),
    }
    for name, (obj, attrs) in objects.items():
        for attr in attrs:
            if not hasattr(obj, attr):
                raise InternalsChanged(
                    f"{name}.{attr} is gone (ray {ray.__version__}, optuna {optuna.__version__})"
                    ": this pcam-search needs the versions pyproject.toml names"
                )


CONNECT_TIMEOUT_S = 10.0  # a cluster address that does not answer by then is an error


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A ``ConnectionError`` naming ``address`` when nothing listens there: ``ray.init`` would
    retry a dead GCS address for minutes. ``auto`` (Ray finds the local cluster) is left to
    Ray."""
    if address in ("auto", "local"):
        return
    host_port = address.removeprefix("ray://").rsplit("/", 1)[0]
    host, sep, port = host_port.rpartition(":")
    if not sep or not port.isdigit():
        raise ConnectionError(f"--address {address!r}: expected HOST:PORT (or ray://HOST:PORT)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise ConnectionError(
            f"no Ray cluster answers at {address} ({why} within {timeout:.0f} s): start one "
            "there with `ray start --head`, or leave --address out for a private Ray"
        ) from None


ENV_PREFIX = "PCAM_"  # environment variables of the project, forwarded to Ray's workers


def worker_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The driver's ``PCAM_*`` settings, for every trial's worker."""
    return {k: v for k, v in environ.items() if k.startswith(ENV_PREFIX)}


def _probe(pool: PoolImages) -> tuple[str, str]:
    """(host, the pool file's signature there, or the error that reading it gave)."""
    try:
        return socket.gethostname(), pool.signature()
    except Exception as e:  # noqa: BLE001 - any failure is the answer: the node cannot read
        return socket.gethostname(), f"error: {e}"


def check_data_on_nodes(data: TrainData, want: str | None = None) -> list[str]:
    """Problems (one line per node) where a node that may run trials cannot read the data.

    Trials map the cache's ``images.npy`` at the driver's path (``PoolImages``), so every node
    needs the same file there (a shared --cache-dir, or the cache built on each node from the
    same source). One tiny task per alive node with CPUs reads its size and ends; a missing file
    or other bytes than the driver's is a problem. In-RAM data (not a cache) goes through the
    object store and needs no check, nor does a one-node instance (the driver's machine).
    ``want``: the signature to match (default: the driver's file's).
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not isinstance(data.images, PoolImages):
        return []
    pool = PoolImages(data.images.path, data.images.rows[:0])
    want = want or pool.signature()
    probe = ray.remote(num_cpus=0)(_probe)
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) < 2:  # the driver's own machine: it just read the file
        return []
    nodes = [n for n in alive if n["Resources"].get("CPU", 0) > 0]
    refs = [
        probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(pool)
        for n in nodes
    ]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=NODE_CHECK_S)
    problems = []
    for node, ref in zip(nodes, refs, strict=True):
        where = f"node {node['NodeID'][:12]} ({node['NodeManagerAddress']})"
        if ref not in ready:
            problems.append(f"{where}: did not answer within {NODE_CHECK_S} s")
            continue
        host, got = ray.get(ref)
        where = f"node {node['NodeID'][:12]} ({host}, {node['NodeManagerAddress']})"
        if got.startswith("error: "):
            problems.append(f"{where}: {got[7:]}")
        elif got != want:
            problems.append(
                f"{where}: {pool.path} holds other data than the driver's (size or bytes "
                "differ); build the cache there from the same source, or share the folder"
            )
    return problems


def cluster_resources() -> dict:
    """Resources of the Ray instance joined by ``init_ray`` ({"CPU": n, "GPU": m, ...})."""
    return ray.cluster_resources()


def shutdown_ray() -> None:
    ray.shutdown()


def run_trials(
    *,
    study: optuna.Study,
    storage: optuna.storages.BaseStorage,
    space_fn: Callable[[optuna.Trial], dict],
    sampler: optuna.samplers.BaseSampler,
    n_trials: int,
    data: TrainData,
    folds: np.ndarray,
    settings: TrialSettings,
    resources: Resources,
    grace_period: int,
    reduction_factor: int,
    asha: bool,
    deadline: Deadline,
    tally: Tally,
    driver: dict,
    storage_path: str,
    verbose: bool,
    trainable: Callable = _trainable,
    keep_top: int = 10,
) -> _TruthfulSearch:
    """Run ``n_trials`` more trials of ``study`` on the Ray instance ``init_ray`` joined.

    ASHA's grace period and rungs count fold-epochs. ``deadline`` (its ``full_fold_epochs`` =
    k x max_epochs) decides when to stop starting trials and when the run ends. Returns the
    searcher (its ``study`` is the live study). Trials left open by an interrupted run are
    closed as FAIL (interrupted) before returning or raising.
    """
    stopped: set[str] = set()
    registry = _TrialRegistry()
    t0 = time.monotonic()
    searcher = _TruthfulSearch(
        space=space_fn,
        metric=METRIC,
        mode="max",
        sampler=sampler,
        study_name=study.study_name,
        storage=storage,
        max_epochs=settings.max_epochs,
        full_fold_epochs=deadline.full_fold_epochs,
        deadline=deadline,
        t0=t0,
        stopped_early=stopped,
        registry=registry,
        tally=tally,
        driver=driver,
        keep_top=keep_top,
    )
    scheduler: TrialScheduler
    if asha:
        scheduler = _RecordingASHA(
            stopped,
            time_attr=TIME_ATTR,
            max_t=deadline.full_fold_epochs,
            grace_period=min(grace_period, deadline.full_fold_epochs),
            reduction_factor=reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    sink = None
    alive = [n for n in ray.nodes() if n.get("Alive")]
    if settings.models_dir is not None and len(alive) > 1:
        # a cluster: kept models reach this node's disk through the sink; on one node the
        # trials write them directly (an actor's start would delay the first trials ~seconds)
        sink = start_sink(str(Path(settings.models_dir).resolve()))
        settings = replace(settings, sink=sink)
    trainable = tune.with_resources(
        tune.with_parameters(trainable, data=data, folds=folds, settings=settings),
        {"cpu": resources.cpus_per_trial, "gpu": resources.gpus_per_trial},
    )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            metric=METRIC,
            mode="max",
            # the searcher ends the run at n_trials finished; the slack lets it replace trials
            # the machinery interrupted (a dead worker: not counted, queued again on resume)
            num_samples=n_trials + max(n_trials, MACHINERY_SLACK),
            max_concurrent_trials=resources.concurrency,
            reuse_actors=True,  # measured 8x less overhead per trial (NOTES.md)
        ),
        run_config=tune.RunConfig(
            name=f"run-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=storage_path,
            verbose=1 if verbose else 0,
            callbacks=[registry],
            stop=_DeadlineStopper(deadline, t0, tally),
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
        ),
    )
    try:
        tuner.fit()
    finally:
        if sink is not None:  # every trial has ended: no write is in flight
            ray.kill(sink)
        searcher.close_open_trials(
            "the run reached its deadline before the trial finished"
            if deadline.active and deadline.expired(time.monotonic() - t0)
            else "the search was interrupted before the trial finished"
        )
    return searcher
