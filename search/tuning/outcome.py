"""What a finished Ray trial is in the study: COMPLETE, PRUNED, FAIL, or FAIL *interrupted*.
Pure; no Ray here (the adapter reads the error and passes its name in).

- COMPLETE: every fold trained every epoch (or stopped itself by patience) with a finite AUC;
- PRUNED: ASHA stopped it at a rung;
- FAIL: the params' own fault (an exception in training, a non-finite final AUC);
- FAIL with ``interrupted``: not the params' fault. The run's end, Ctrl-C, the deadline, or
  the machinery (a worker or actor that died, a node marked dead, the raylet gone, a worker
  killed by Ray's memory monitor). These trials do not count toward ``--trials`` and their
  params are queued again on resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from search.common.attrs import EARLY_STOPPED, ERROR_MESSAGE, ERROR_TYPE, FAIL_REASON, INTERRUPTED

# Ray's errors that say the machinery failed, not the trial's code. Ray's own
# ``OutOfMemoryError`` (its memory monitor killed the worker) is one; torch's CUDA
# ``OutOfMemoryError`` is the params' (batch too large), so the adapter passes the error's
# module too and only ``ray.*`` errors are looked up here.
MACHINERY_ERRORS = frozenset(
    {
        "RayActorError",
        "ActorDiedError",
        "ActorUnavailableError",
        "ActorUnschedulableError",
        "WorkerCrashedError",
        "NodeDiedError",
        "LocalRayletDiedError",
        "RaySystemError",
        "ObjectLostError",
        "OwnerDiedError",
        "ObjectFetchTimedOutError",
        "ObjectStoreFullError",
        "OutOfMemoryError",
        "OutOfDiskError",
        "RpcError",
        "TaskCancelledError",
    }
)
# The disk that keeps the models is full: not the params' fault, and no later trial can be
# kept either, so the run stops (``STOPS_THE_RUN``)
ENVIRONMENT_ERRORS = frozenset({"DiskFullError"})
STOPS_THE_RUN = ENVIRONMENT_ERRORS
# A worker that died without writing an error file (``kill -9``, the kernel's OOM killer)
WORKER_GONE = "WorkerError"
DEADLINE_REASON = "at its pace it could not finish before the deadline"
MACHINERY_REASON = "the Ray worker or node running it failed ({}); not the params' fault"


@dataclass(frozen=True)
class TrialError:
    """The exception that ended a trial, as read from Ray's error files."""

    type: str  # class name, e.g. "ValueError"
    message: str
    module: str = ""  # the class's module, e.g. "ray.exceptions" ("" when unknown)

    @property
    def machinery(self) -> bool:
        """Whether Ray's machinery failed rather than the trial's code."""
        if self.type == WORKER_GONE and not self.module:
            return True
        if self.type in ENVIRONMENT_ERRORS:
            return True
        return self.module.startswith("ray") and self.type in MACHINERY_ERRORS


@dataclass(frozen=True)
class Outcome:
    """The state to record (an Optuna ``TrialState`` name) and the user attrs that say why."""

    state: str  # "COMPLETE", "PRUNED" or "FAIL"
    attrs: dict = field(default_factory=dict)
    error_text: str = ""  # "Type: message" of a FAIL of the params' own

    @property
    def interrupted(self) -> bool:
        return bool(self.attrs.get(INTERRUPTED))


def classify(
    *,
    fold_epochs: int,
    full_fold_epochs: int,
    value: float | None,
    error: TrialError | None = None,
    self_stopped: bool = False,
    pruned: bool = False,
    cut_by_deadline: bool = False,
    stop_reason: str = "the search stopped before the trial finished",
) -> Outcome:
    """The outcome of a trial that trained ``fold_epochs`` of ``full_fold_epochs`` and last
    reported ``value`` (None or NaN: no finite value). ``pruned``: ASHA stopped it;
    ``cut_by_deadline``: the deadline stopped it; ``stop_reason``: why the run stopped the
    others (the run's end, Ctrl-C)."""
    finite = value is not None and value == value and abs(value) != float("inf")
    if error is not None:
        attrs = {ERROR_TYPE: error.type, ERROR_MESSAGE: error.message}
        if error.machinery:
            reason = MACHINERY_REASON.format(error.type)
            if error.type in ENVIRONMENT_ERRORS:
                reason = error.message
            return Outcome("FAIL", {**attrs, INTERRUPTED: True, FAIL_REASON: reason})
        return Outcome("FAIL", attrs, f"{error.type}: {error.message}")
    if fold_epochs >= full_fold_epochs and finite:
        return Outcome("COMPLETE")  # every fold trained every epoch: the mean over k
    if self_stopped and finite:  # early stopping (patience) ended every fold
        return Outcome("COMPLETE", {EARLY_STOPPED: True})
    if fold_epochs >= full_fold_epochs:
        msg = f"final mean AUC is {value}"
        return Outcome(
            "FAIL", {ERROR_TYPE: "NonFiniteAUC", ERROR_MESSAGE: msg}, f"NonFiniteAUC: {msg}"
        )
    if pruned:
        return Outcome("PRUNED")
    reason = DEADLINE_REASON if cut_by_deadline else stop_reason
    return Outcome("FAIL", {INTERRUPTED: True, FAIL_REASON: reason})
