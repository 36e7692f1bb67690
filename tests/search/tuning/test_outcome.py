"""The pure classifier of a finished trial's state."""

import math

import pytest

from search.common.attrs import EARLY_STOPPED, ERROR_TYPE, FAIL_REASON, INTERRUPTED
from search.tuning.outcome import DEADLINE_REASON, TrialError, classify

FULL = 36


def test_classify_complete_needs_every_fold_epoch_and_a_finite_value():
    assert classify(fold_epochs=FULL, full_fold_epochs=FULL, value=0.9).state == "COMPLETE"
    half = classify(fold_epochs=12, full_fold_epochs=FULL, value=0.9)
    assert half.state == "FAIL" and half.interrupted


def test_classify_self_stopped_is_complete_and_says_so():
    out = classify(fold_epochs=12, full_fold_epochs=FULL, value=0.9, self_stopped=True)
    assert out.state == "COMPLETE" and out.attrs == {EARLY_STOPPED: True}


def test_classify_nonfinite_final_value_is_the_params_fail():
    out = classify(fold_epochs=FULL, full_fold_epochs=FULL, value=math.nan)
    assert out.state == "FAIL" and not out.interrupted
    assert out.attrs[ERROR_TYPE] == "NonFiniteAUC" and out.error_text


def test_classify_pruned_by_asha():
    assert classify(fold_epochs=3, full_fold_epochs=FULL, value=0.8, pruned=True).state == "PRUNED"


def test_classify_deadline_cut_is_interrupted_with_the_reason():
    out = classify(fold_epochs=9, full_fold_epochs=FULL, value=0.8, cut_by_deadline=True)
    assert out.state == "FAIL" and out.interrupted and out.attrs[FAIL_REASON] == DEADLINE_REASON


@pytest.mark.parametrize(
    "error",
    [
        TrialError("ActorDiedError", "the actor died", "ray.exceptions"),
        TrialError("ActorUnavailableError", "unavailable", "ray.exceptions"),
        TrialError("NodeDiedError", "node marked dead", "ray.exceptions"),
        TrialError("OutOfMemoryError", "the memory monitor killed it", "ray.exceptions"),
        TrialError("WorkerCrashedError", "crashed", "ray.exceptions"),
        TrialError("WorkerError", "the trial's worker failed without a recorded error"),
    ],
)
def test_classify_machinery_failure_is_interrupted_not_the_params(error):
    out = classify(fold_epochs=6, full_fold_epochs=FULL, value=0.8, error=error)
    assert out.state == "FAIL" and out.interrupted and error.type in out.attrs[FAIL_REASON]
    assert out.error_text == ""  # not counted as the params' error


@pytest.mark.parametrize(
    "error",
    [
        TrialError("ValueError", "bad depth", "builtins"),
        TrialError("OutOfMemoryError", "CUDA out of memory", "torch"),  # the batch's fault
        TrialError("RayTaskError", "wrapped", "ray.exceptions"),
    ],
)
def test_classify_training_error_is_the_params_fail(error):
    out = classify(fold_epochs=6, full_fold_epochs=FULL, value=0.8, error=error)
    assert out.state == "FAIL" and not out.interrupted
    assert out.attrs[ERROR_TYPE] == error.type and out.error_text.startswith(error.type)
    assert INTERRUPTED not in out.attrs
