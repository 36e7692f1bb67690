"""The searcher, scheduler and callbacks that keep the Optuna study truthful (see the package
docstring): ``_TruthfulSearch``, ``_RecordingASHA``, the deadline's ``Stopper``."""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import optuna
import ray
from optuna.trial import TrialState
from ray import cloudpickle, tune
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from data_pipeline.atomic import remove
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
    PROMOTED_FROM,
    RAY_TRIAL_ID,
    RESUMED_FROM,
    SECONDS,
    TRIAL_EPOCHS,
    VAL_LOSS,
)
from search.common.study import value_of
from search.training.checkpoint import RESUMED
from search.tuning.deadline import Deadline
from search.tuning.ladder import next_promotion
from search.tuning.outcome import STOPS_THE_RUN, WORKER_GONE, TrialError, classify
from search.tuning.progress import Tally
from search.tuning.ray_adapter.trial import METRIC, TIME_ATTR

MACHINERY_SLACK = 8  # trials Ray may create beyond --trials to replace interrupted ones


class _RecordingASHA(ASHAScheduler):
    """ASHA that remembers which trials it stopped before their last epoch, and leaves the
    promoted trials of the growing top rung alone (``search.tuning.ladder``): its rungs
    compare trials of one schedule length, and a promoted trial is already a study's best."""

    def __init__(self, stopped: set[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stopped_early = stopped

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if TRIAL_EPOCHS in trial.config:
            return TrialScheduler.CONTINUE
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP and result.get(TIME_ATTR, 0) < self._max_t:
            self.stopped_early.add(trial.trial_id)
        return decision

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        if TRIAL_EPOCHS in trial.config:
            self._trial_info.pop(trial.trial_id, None)  # never recorded in a rung
            return
        super().on_trial_complete(tune_controller, trial, result)


class _DeadlineStopper(tune.Stopper):
    """Stops a trial as soon as its own pace says it cannot finish before the deadline (its
    worker is better spent on one that can), and the whole run when the deadline passes or
    the tally says the run cannot go on (a full disk). Either way the trials are recorded as
    interrupted (re-run on resume)."""

    def __init__(
        self,
        deadline: Deadline,
        t0: float,
        tally: Tally,
        dead: Callable[[], list[str]] = lambda: [],
    ) -> None:
        self.deadline, self.t0, self.tally = deadline, t0, tally
        self.dead = dead  # Ray's own processes that died (a private Ray's raylet, GCS)

    def __call__(self, trial_id: str, result: dict) -> bool:
        if self.tally.halted:
            return True
        done, seconds = int(result.get(TIME_ATTR, 0)), float(result.get("trial_seconds", 0.0))
        if not self.deadline.should_cut(time.monotonic() - self.t0, done, seconds, trial_id):
            return False
        self.deadline.cut.add(trial_id)
        return True

    def stop_all(self) -> bool:
        dead = self.dead()
        if dead and not self.tally.halted:
            self.tally.halted = (
                f"Ray's {' and '.join(dead)} died during the search (killed, or out of memory); "
                "the study is consistent: the running trials are interrupted and run again "
                "first when you run the same command again"
            )
        return bool(self.tally.halted) or self.deadline.stop_all(time.monotonic() - self.t0)


class _TrialRegistry(tune.Callback):
    """Keeps each Ray trial object (its error file) where the searcher can reach it."""

    def __init__(self) -> None:
        self.trials: dict = {}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.trials[trial.trial_id] = trial


def _last_report_attrs(result: dict | None) -> dict:
    """The trial's user attrs from its last report (none when it never reported)."""
    if not result or METRIC not in result:
        return {}
    attrs = {
        AUC_FOLDS: [float(a) for a in result.get("auc_folds", [])],
        SECONDS: round(float(result.get("trial_seconds", 0.0)), 2),
        DEVICE: result.get("device", ""),
        PRECISION: result.get("precision", ""),
        NODE: result.get("node", ""),
        VAL_LOSS: float(result.get("val_loss", float("nan"))),
        IMAGES_PER_S: round(float(result.get("images_per_s", 0.0)), 1),
    }
    if result.get("pool"):
        attrs[POOL] = result["pool"]
    return attrs


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
        promote_to: int = 0,
        eta: int = 3,
        checkpoint_of: Callable[[dict], Path | None] = lambda config: None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._keep_top = keep_top
        self._promote_to, self._eta = promote_to, eta  # the growing top rung (0: off)
        # a trial's resumable state: kept while it may be re-run (interrupted), else removed
        self._checkpoint_of = checkpoint_of
        self._configs: dict[str, dict] = {}
        # COMPLETE trials whose fold models are on disk: path -> value (earlier runs included)
        self._kept: dict[str, float] = {
            t.user_attrs[MODELS_DIR]: value_of(t)
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.user_attrs.get(MODELS_DIR)
        }
        self._max_epochs = max_epochs
        self._full = full_fold_epochs
        self._full_of: dict[str, int] = {}  # a promoted trial's own full fold-epochs
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
        guard, elapsed = self._deadline.needs_guard(), time.monotonic() - self._t0
        if not self._deadline.may_start(elapsed):
            if self._deadline.running and not self._deadline.closed(elapsed):
                return None  # its waste share is taken: ask again when a running trial ends
            self._deadline.not_started += 1
            self._deadline.reached = True
            return self.FINISHED  # Ray starts no further trial and lets running ones end
        self._promote()
        config = super().suggest(trial_id)
        if not isinstance(config, dict):
            return config
        if guard:
            self._deadline.guard = trial_id
        self._deadline.started(trial_id, elapsed)
        ot = self._ot_trials[trial_id]
        epochs = ot.user_attrs.get(TRIAL_EPOCHS)
        if epochs:  # a promoted trial (or its retry): its own schedule length
            config = {**config, TRIAL_EPOCHS: int(epochs)}
            self._full_of[trial_id] = self._full // self._max_epochs * int(epochs)
        ot.set_user_attr(DRIVER, self._driver)
        ot.set_user_attr(RAY_TRIAL_ID, trial_id)
        self._reported[trial_id] = set()
        self._tally.running[ot.number] = 0
        self._configs[trial_id] = config
        return config

    def _promote(self) -> None:
        """Queue the growing top rung's next trial, when one is due (``search.tuning.ladder``;
        never under a deadline, whose trials are short and whose winner trains long after)."""
        if not self._promote_to or self._deadline.active:
            return
        trials = self.study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials):
            return  # what is queued (retries, a promotion) runs first
        due = next_promotion(trials, self._max_epochs, self._promote_to, self._eta)
        if due is not None:
            self.study.enqueue_trial(
                due.params, user_attrs={TRIAL_EPOCHS: due.epochs, PROMOTED_FROM: due.source}
            )

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        ot = self._ot_trials.get(trial_id)
        if ot is None or trial_id in self._completed_trials or METRIC not in result:
            return
        step = int(result.get(TIME_ATTR, result["epoch"]))
        if step in self._reported[trial_id]:
            return
        # fold-epochs trained in this run (a resumed trial's replayed reports were not)
        resumed = int(result.get(RESUMED, 0))
        if resumed and not self._reported[trial_id]:
            ot.set_user_attr(RESUMED_FROM, resumed)
        base = max(max(self._reported[trial_id], default=0), resumed)
        self._tally.fold_epochs += max(0, step - base)
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
        attrs: dict = {EPOCHS_RUN: epochs, FOLD_EPOCHS: fold_epochs, **_last_report_attrs(result)}
        value = float(result[METRIC]) if result and METRIC in result else float("nan")
        err = _error_of(self._registry.trials.get(trial_id)) if error else None
        if err is not None and err.type in STOPS_THE_RUN:
            self._tally.halted = err.message  # the stopper ends the run at once
        outcome = classify(
            fold_epochs=fold_epochs,
            full_fold_epochs=self._full_of.pop(trial_id, self._full),
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
        else:  # pruned, failed or finished: never resumed (a finished trial removed its own)
            checkpoint = self._checkpoint_of(self._configs.pop(trial_id, {}))
            if checkpoint is not None:
                remove(checkpoint)
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
