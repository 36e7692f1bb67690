"""The growing top rung: the best params of a study train again with longer schedules.

ASHA ranks trials at fold-epoch rungs inside one schedule length (``max_epochs``); past
~20 trials the best of a study differ by less than one trial's fold noise at that length,
and the length the submission trains (``final_max_epochs``) can rank them otherwise. So once
a study holds ``eta`` COMPLETE trials at a length per trial at twice that length, the best
params not yet run there start again as a new trial with the doubled schedule (a fresh
learning-rate schedule, never a continuation): lengths ``max_epochs x 2^i`` up to
``final_max_epochs`` (CPU: 12, 24, 48 epochs). Over a long study the top of the ladder holds
the best few params scored at the submission's own length: a like-for-like estimate of what
``pcam-refit --best`` trains, and a rank made at that length.

A promoted trial is an ordinary trial of the study with the same params, the user attrs
``trial_epochs`` and ``promoted_from``; ASHA leaves it alone (its rungs compare one length).
Pure functions here; the searcher enqueues what ``next_promotion`` returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from search.common.attrs import TRIAL_EPOCHS
from search.common.study import value_of


@dataclass(frozen=True)
class Promotion:
    """Run ``params`` again as a new trial of ``epochs`` epochs (from trial ``source``)."""

    params: dict[str, Any]
    epochs: int
    source: int


def ladder(base: int, top: int) -> list[int]:
    """Schedule lengths, shortest first: ``base`` doubled while it stays <= ``top``."""
    if base < 1:
        raise ValueError(f"the trials' epochs must be >= 1, got {base}")
    lengths = [base]
    while lengths[-1] * 2 <= top:
        lengths.append(lengths[-1] * 2)
    return lengths


def epochs_of(trial: FrozenTrial, base: int) -> int:
    """A trial's schedule length: its own for a promoted trial, else the study's."""
    return int(trial.user_attrs.get(TRIAL_EPOCHS, base))


def _params_key(params: dict[str, Any]) -> tuple:
    return tuple(sorted(params.items()))


def _params(trial: FrozenTrial) -> dict[str, Any]:
    # a WAITING (enqueued, not yet asked) trial has its params in Optuna's fixed_params
    return dict(trial.params or trial.system_attrs.get("fixed_params", {}))


def next_promotion(
    trials: Sequence[FrozenTrial], base: int, top: int, eta: int
) -> Promotion | None:
    """The promotion due now, the longest length first, or None.

    Length ``L = 2 x l`` gets one more trial when the COMPLETE trials of length ``l`` number
    at least ``eta`` x (the distinct params tried at ``L``, in any state, plus one); it takes
    the best of them whose params have not been tried at ``L``.
    """
    lengths = ladder(base, top)
    for lower, upper in reversed(list(zip(lengths, lengths[1:], strict=False))):
        tried = {
            _params_key(_params(t)) for t in trials if epochs_of(t, base) == upper and _params(t)
        }
        done = sorted(
            (t for t in trials if t.state == TrialState.COMPLETE and epochs_of(t, base) == lower),
            key=value_of,
            reverse=True,
        )
        if len(done) < eta * (len(tried) + 1):
            continue
        for t in done:
            if _params_key(t.params) not in tried:
                return Promotion(dict(t.params), upper, t.number)
    return None
