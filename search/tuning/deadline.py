"""When a search must stop, and whether a new trial may still start. Pure; no Ray here.

A run may have a search timeout (``--timeout S``: the search alone) and an end-to-end budget
(``--budget S``: search + the refit that builds the submission). Both are turned into one end
time for the search, measured from its start:

- ``--timeout``: the end is S;
- ``--budget``: the end is S minus the time reserved for the final model: what it needs to
  train ``final_fold_epochs`` (k x the target epochs) at the best trial's pace, but never more
  than (1 - ``search_share``) x S, and never less than the refit's own estimate, so the
  submission still fits. The final model is the best params again on every fold, for as many
  epochs as fit what is left (``final_epochs``): at a fixed wall budget epochs per final
  model, not trials, decide the test AUC (docs/benchmarks.md, "Model quality per unit of
  compute"), and how many seconds an epoch takes depends on the machine, so the split
  follows the pace.
  When no more epochs than the search's fit, the refit reuses the best trial's saved fold
  models and only predicts the test set (at the best trial's pace). With ``retrain`` it
  trains them again: the best trial's own seconds per fold-epoch x the fold-epochs of a full
  refit x ``refit_factor``, plus the predictions.

A trial starts only if it can *finish* before the end: reach ASHA's first rung (``first_rung``
fold-epochs), where it either ends as PRUNED or goes on, at the pace the trials that reported
last ran (their 75th percentile: the long-running winners are the slower configurations; the
latest, so a machine that got busy mid-search counts at once). A running trial whose own pace
now says it cannot train every fold-epoch before the end is stopped at once
(its worker goes to one that can), and trials still running at the end are stopped; both are
recorded as interrupted, so the study holds only fully trained COMPLETE trials. While a full
trial still fits, every start is one. After that a trial that can only reach its first rung
starts while the fold-epochs the deadline stopped, plus those it may still stop (each running
trial that cannot finish: at least its first rung, lost if ASHA lets it go on), plus the new
trial's first rung stay within ``WASTE_SHARE`` of this run's fold-epochs; otherwise the worker
waits for one of them to end (a PRUNED trial frees its share). Starting no such trial would
leave the workers idle for the last full-trial time, ~20% of a 10-minute budget on 2 cores;
starting every one wasted 21% of a loaded machine's fold-epochs on trials that passed their
first rung and were then stopped (measured).

A deadline run promises something to submit, so with ``--budget`` or ``--timeout`` one trial
is *guarded*: while no trial is COMPLETE (in this run or before), the next trial started (a new
study's first: the space's known-good ``[[start]]`` recipe) is never cut and the run waits for
it past the end; if it ends without a value, the next trial started is guarded. (Without it a
loaded machine could end a ``--timeout`` search with the start recipe interrupted and no
COMPLETE trial, or with a weaker one: measured.) And when the budget is too small for the
final model's target epochs even with the search at its least share (``starved``), every
search second is a final epoch lost: the search ends as soon as a trial is COMPLETE (measured:
a fixed recipe trained for the whole budget beat a search at 300-600 s on 2 cores).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from search.common.defaults import SEARCH_SHARE  # noqa: F401  (the least share, defined once)
from search.common.pace import (  # noqa: F401  (re-exported: the deadline's callers read them here)
    FINAL_MARGIN,
    FULL_FIT_FACTOR,
    MARGIN,
    MAX_FULL_MODELS,
    PREDICT_COST,
    REFIT_FACTOR,
    REFIT_FIXED_S,
    STOP_S,
    TIE_AUC,
    Pace,
    final_epochs,
    full_fit_plan,
    full_fold_epochs,
    pick_final,
    predict_seconds,
)

# A new trial's length is estimated from the paces of the trials that reported last: as many
# as run at once on a 2-4 worker machine, so a load that began mid-search counts at once
RECENT_TRIALS = 4
# The share of a deadline run's fold-epochs it may risk on trials that can only reach their
# first rung (the rest of the deadline's waste comes from a pace that changed mid-trial)
WASTE_SHARE = 0.05


@dataclass
class Deadline:
    """The search's end time and the start rule (see the module docstring). Times in seconds
    since the search started."""

    full_fold_epochs: int  # k * max_epochs: one trial that is never stopped (and the refit)
    first_rung: int | None = None  # fold-epochs to ASHA's first decision (None: no ASHA)
    timeout: float | None = None  # the search alone
    budget: float | None = None  # search + refit
    predict_images: int = 0  # test patches x TTA views the refit predicts
    refit_factor: float = REFIT_FACTOR
    final_factor: float = REFIT_FACTOR  # the final model's (FULL_FIT_FACTOR for a full fit)
    retrain: bool = False  # the refit trains the best params again (else reuses its models)
    search_share: float = 1.0  # with a budget: the least share the search gets
    final_fold_epochs: int = 0  # with a budget: k x the final model's target epochs (0: none)
    paces: dict[str, Pace] = field(default_factory=dict)  # trial id -> pace, latest report last
    # trial id -> seconds per fold-epoch between its last two reports: the pace *now* (another
    # process taking part of the CPU shows here first, long before in a trial's average)
    recent: dict[str, float] = field(default_factory=dict)
    _last: dict[str, tuple[float, int]] = field(default_factory=dict)  # trial -> (s, fold-ep)
    best: str | None = None  # trial id of the best COMPLETE trial so far
    not_started: int = 0  # suggestions refused because a full trial would not fit
    cut: set[str] = field(default_factory=set)  # trials stopped: they could not finish in time
    reached: bool = False  # the deadline ended the run (no more starts, or the end passed)
    settled: bool = False  # the study holds a COMPLETE trial (this run or an earlier one)
    guard: str | None = None  # the trial the deadline lets finish (see the module docstring)
    running: dict[str, float] = field(default_factory=dict)  # trial id -> elapsed at its start

    @property
    def active(self) -> bool:
        return self.timeout is not None or self.budget is not None

    def needs_guard(self) -> bool:
        """Whether the next trial started is to be guarded: a deadline (budget or timeout),
        no COMPLETE trial yet, none guarded."""
        return self.active and not self.settled and self.guard is None

    def started(self, trial: str, elapsed: float) -> None:
        """Record that ``trial`` started ``elapsed`` seconds after the search."""
        self.running[trial] = elapsed

    def finished(self, trial: str, complete: bool) -> None:
        """Record that ``trial`` ended (``complete``: COMPLETE with a value)."""
        self.running.pop(trial, None)
        self.settled |= complete
        if trial == self.guard:
            self.guard = None

    def starved(self) -> bool:
        """A budget whose final model cannot get its target epochs even with the search at its
        least share, once the pace is known: searching longer only takes final epochs."""
        if self.budget is None or not self.final_fold_epochs or not self.paces:
            return False
        return self.final_s() > self.budget * (1 - self.search_share)

    def observe(self, trial: str, seconds: float, fold_epochs: int, images_per_s: float) -> None:
        """Record a trial's pace from its latest report (its average, and since the last)."""
        if fold_epochs <= 0 or seconds <= 0:
            return
        self.paces.pop(trial, None)  # re-inserted last: the latest reports are the newest paces
        self.paces[trial] = Pace(seconds / fold_epochs, images_per_s)
        s0, fe0 = self._last.get(trial, (0.0, 0))
        if fold_epochs > fe0:
            self.recent[trial] = (seconds - s0) / (fold_epochs - fe0)
            self._last[trial] = (seconds, fold_epochs)

    def full_trial_s(self) -> float | None:
        """Estimated seconds of a trial that runs every fold-epoch; None before any report."""
        return self._estimate(self.full_fold_epochs)

    def first_rung_s(self) -> float | None:
        """Estimated seconds for a new trial to finish or pass ASHA's first rung."""
        return self._estimate(self.rung)

    @property
    def rung(self) -> int:
        """Fold-epochs to ASHA's first decision (a whole trial without ASHA)."""
        return self.first_rung or self.full_fold_epochs

    def _done(self, trial: str) -> int:
        """Fold-epochs ``trial`` had trained at its latest report (0 before one)."""
        return self._last.get(trial, (0.0, 0))[1]

    def _estimate(self, fold_epochs: int) -> float | None:
        """At the pace of the trials that reported last (the machine's load now, not the first
        trials'): the 75th percentile of their seconds per fold-epoch, each the slower of its
        average and its pace since its previous report."""
        if not self.paces:
            return None
        latest = list(self.paces)[-RECENT_TRIALS:]
        rates = [
            max(self.paces[t].seconds_per_fold_epoch, self.recent.get(t, 0.0)) for t in latest
        ]
        return float(np.percentile(rates, 75)) * fold_epochs * MARGIN

    def _rate(self, trial: str) -> float:
        """Seconds per fold-epoch of ``trial``: the slower of its average and its pace now."""
        return max(self.paces[trial].seconds_per_fold_epoch, self.recent.get(trial, 0.0))

    def refit_s(self) -> float:
        """Estimated seconds of the refit of the best trial (0 without a budget)."""
        if self.budget is None:
            return 0.0
        pace = self.best_pace() or self._typical_pace()  # no COMPLETE trial yet: a typical one
        if pace is None:
            return REFIT_FIXED_S
        train = 0.0
        if self.retrain:
            train = pace.seconds_per_fold_epoch * self.full_fold_epochs * self.refit_factor
        return (train + self.predict_s(pace)) * MARGIN + REFIT_FIXED_S

    def end(self) -> float | None:
        """Seconds after the start when the search must have stopped; None = no deadline."""
        ends = [t for t in (self.timeout,) if t is not None]
        if self.budget is not None:
            final = min(self.final_s(), self.budget * (1 - self.search_share))
            ends.append(self.budget - max(self.refit_s(), final))
        return min(ends) if ends else None

    def final_s(self) -> float:
        """Estimated seconds to train the final model's ``final_fold_epochs`` and predict the
        test set; before any pace is known, all the budget the search may leave it."""
        if self.budget is None or not self.final_fold_epochs:
            return 0.0
        pace = self.best_pace() or self._typical_pace()
        if pace is None:
            return self.budget
        train = pace.seconds_per_fold_epoch * self.final_fold_epochs * self.final_factor
        return (train + self.predict_s(pace)) * MARGIN + REFIT_FIXED_S + STOP_S

    def _typical_pace(self) -> Pace | None:
        if not self.paces:
            return None
        ranked = sorted(self.paces.values(), key=lambda p: p.seconds_per_fold_epoch)
        return ranked[len(ranked) // 2]

    def best_pace(self) -> Pace | None:
        """The best COMPLETE trial's pace (None before one)."""
        return self.paces.get(self.best) if self.best else None

    def predict_s(self, pace: Pace) -> float:
        """Estimated seconds to predict the test set at ``pace`` (TTA views included)."""
        return predict_seconds(self.predict_images, pace)

    def may_start(self, elapsed: float) -> bool:
        """Whether a new trial may start now: a full trial fits before the end, or its first
        rung does and the waste it risks fits ``WASTE_SHARE`` (see the module docstring)."""
        if self.needs_guard():
            return True
        if self.closed(elapsed):
            return False
        end = self.end()
        if end is None or elapsed + (self.full_trial_s() or 0.0) < end:
            return True
        done = sum(map(self._done, self._last))
        return self.lost() + self.at_risk(elapsed) + self.rung <= WASTE_SHARE * (done + self.rung)

    def closed(self, elapsed: float) -> bool:
        """Whether no trial may start now or later: not even a first rung fits before the end
        (or a starved budget has its COMPLETE trial)."""
        if self.needs_guard():
            return False
        if self.settled and self.starved():
            return True
        end = self.end()
        return end is not None and elapsed + (self.first_rung_s() or 0.0) >= end

    def lost(self) -> int:
        """Fold-epochs of the trials the deadline stopped (they could not finish)."""
        return sum(map(self._done, self.cut))

    def at_risk(self, elapsed: float) -> int:
        """Fold-epochs the deadline may still stop: each running trial (not the guarded one)
        whose pace says it cannot finish before the end, at least its first rung."""
        risk = 0
        for trial, start in self.running.items():
            if trial == self.guard or trial in self.cut:
                continue
            done = self._done(trial)
            if trial in self.paces:
                fits = self.can_finish(elapsed, (self.full_fold_epochs - done) * self._rate(trial))
            else:  # no report yet: the full trial at the latest trials' pace, from its start
                fits = self.can_finish(start, self.full_trial_s() or 0.0)
            if not fits:
                risk += max(done, self.rung)
        return risk

    def should_cut(
        self, elapsed: float, fold_epochs: int, seconds: float, trial: str | None = None
    ) -> bool:
        """Whether a running trial, ``fold_epochs`` done in ``seconds``, should stop now: it is
        past its first rung (before it, ASHA may still end it as PRUNED, and it was started
        because it could get there) and its own pace says it cannot train every fold-epoch
        before the end: at the slower of its average pace and its pace since its previous
        report (the pace now: a machine that got busy shows there first). The guarded trial is
        never cut; the others are at the end, while the run waits for it."""
        if trial is not None and trial == self.guard:
            return False
        if self.guard is not None and self.expired(elapsed):
            return True
        if fold_epochs <= 0 or seconds <= 0 or fold_epochs < (self.first_rung or 0):
            return False
        rate = max(seconds / fold_epochs, self.recent.get(trial, 0.0) if trial else 0.0)
        return not self.can_finish(elapsed, (self.full_fold_epochs - fold_epochs) * rate)

    def can_finish(self, elapsed: float, seconds_left: float) -> bool:
        """Whether a running trial that needs ``seconds_left`` more ends before the end."""
        end = self.end()
        return end is None or elapsed + seconds_left <= end

    def expired(self, elapsed: float) -> bool:
        """Whether the end has passed (or a starved budget's search has its COMPLETE trial)."""
        end = self.end()
        over = end is not None and elapsed >= end or (self.settled and self.starved())
        self.reached |= over
        return over

    def stop_all(self, elapsed: float) -> bool:
        """Whether the whole run stops now: expired, and no guarded trial is running."""
        return self.guard is None and self.expired(elapsed)
