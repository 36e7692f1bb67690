from dataclasses import replace

import pytest

from search.tuning.deadline import (
    FINAL_MARGIN,
    FULL_FIT_FACTOR,
    MARGIN,
    PREDICT_COST,
    RECENT_TRIALS,
    REFIT_FACTOR,
    REFIT_FIXED_S,
    STOP_S,
    Deadline,
    Pace,
    final_epochs,
    pick_final,
)


def test_deadline_without_limits_always_starts_and_never_expires():
    d = Deadline(full_fold_epochs=36)
    assert not d.active and d.end() is None
    assert d.may_start(1e9) and not d.expired(1e9)


def test_deadline_first_trial_starts_before_any_pace_is_known():
    d = Deadline(full_fold_epochs=36, timeout=100, settled=True)
    assert d.may_start(99) and not d.may_start(100) and d.expired(100)
    # with no COMPLETE trial yet, the next (guarded) trial starts whenever it is asked for
    assert Deadline(full_fold_epochs=36, timeout=100).may_start(100)


def test_deadline_refuses_a_trial_that_cannot_finish():
    # without ASHA a trial finishes after all 36 fold-epochs: 2 s each x margin = ~83 s
    d = Deadline(full_fold_epochs=36, timeout=600, settled=True)  # a COMPLETE trial exists
    d.observe("a", seconds=20, fold_epochs=10, images_per_s=1000)
    full = 2 * 36 * MARGIN
    assert d.full_trial_s() == pytest.approx(full)
    assert d.may_start(600 - full - 1) and not d.may_start(600 - full)


def test_deadline_with_asha_starts_a_trial_that_can_reach_its_first_rung():
    # ASHA decides at 3 fold-epochs (PRUNED there, or it goes on): 2 s x 3 x margin. 200
    # fold-epochs done and nothing lost: a first rung's risk fits the waste share
    d = Deadline(full_fold_epochs=36, first_rung=3, timeout=600, settled=True)
    d.observe("a", seconds=400, fold_epochs=200, images_per_s=1000)
    rung = 2 * 3 * MARGIN
    assert d.may_start(600 - rung - 1) and not d.may_start(600 - rung)
    assert not d.closed(600 - rung - 1) and d.closed(600 - rung)


def test_deadline_first_rung_only_starts_keep_within_the_waste_share():
    # 1 s per fold-epoch, 12 fold-epochs a trial, first rung 3; 100 s left: no full trial
    # fits (12 x 1 x margin), a first rung does
    d = Deadline(full_fold_epochs=12, first_rung=3, timeout=200, settled=True)
    d.observe("done", seconds=100, fold_epochs=100, images_per_s=100)
    now = 200 - 12 * MARGIN + 1
    assert d.may_start(now)  # 0 lost + 0 at risk + 3 <= 5% of 103
    d.started("a", now)
    # "a" cannot finish: its first rung is at risk, and a second one would pass the share
    assert d.at_risk(now) == 3 and not d.may_start(now) and not d.closed(now)
    d.finished("a", complete=False)  # ASHA pruned it at its first rung: nothing lost
    assert d.at_risk(now) == 0 and d.may_start(now)


def test_deadline_waste_share_counts_the_trials_it_stopped():
    d = Deadline(full_fold_epochs=12, first_rung=3, timeout=200, settled=True)
    d.observe("done", seconds=100, fold_epochs=100, images_per_s=100)
    d.observe("b", seconds=4, fold_epochs=4, images_per_s=100)
    d.cut.add("b")  # stopped past its first rung: 4 fold-epochs lost
    assert d.lost() == 4
    assert not d.may_start(200 - 12 * MARGIN + 1)  # 4 + 3 > 5% of 107


def test_deadline_a_running_trial_that_can_finish_risks_nothing():
    d = Deadline(full_fold_epochs=12, first_rung=3, timeout=200, settled=True)
    d.observe("t", seconds=6, fold_epochs=6, images_per_s=100)
    d.started("t", 0)
    assert d.at_risk(150) == 0  # 6 fold-epochs left at 1 s: ends at 156 s
    assert d.at_risk(195) == 6  # ends at 201 s: its 6 fold-epochs are at risk
    d.guard = "t"
    assert d.at_risk(195) == 0  # the guarded trial is never stopped


def test_deadline_full_trial_uses_the_slower_trials_pace():
    d = Deadline(full_fold_epochs=10, timeout=600)
    for i, pace in enumerate([1, 1, 1, 5]):
        d.observe(str(i), seconds=pace * 3, fold_epochs=3, images_per_s=100)
    # 75th percentile of (1, 1, 1, 5) s per fold-epoch = 2
    assert d.full_trial_s() == pytest.approx(2 * 10 * MARGIN)


def test_deadline_new_trials_are_sized_at_the_latest_trials_pace():
    # the first trials ran at 1 s per fold-epoch, then the machine got busy (3 s): a new trial
    # is sized at the pace of the trials that reported last, not of the first ones
    d = Deadline(full_fold_epochs=12, first_rung=3, timeout=600, settled=True)
    for i in range(RECENT_TRIALS):
        d.observe(f"early{i}", seconds=12, fold_epochs=12, images_per_s=100)
    for i in range(RECENT_TRIALS):
        d.observe(f"late{i}", seconds=9, fold_epochs=3, images_per_s=100)
    assert d.first_rung_s() == pytest.approx(3 * 3 * MARGIN)


def test_deadline_should_cut_at_the_pace_now():
    # 9 fold-epochs in 9 s, then 3 more took 12 s (4 s each: another job took the CPU). The
    # average (1.75 s) says the last 24 fit the 60 s left; the pace now (4 s) says they do not
    d = Deadline(full_fold_epochs=36, first_rung=3, timeout=100, settled=True)
    d.observe("t", seconds=9, fold_epochs=9, images_per_s=100)
    assert not d.should_cut(40, 9, 9, "t")
    d.observe("t", seconds=21, fold_epochs=12, images_per_s=100)
    assert d.recent["t"] == pytest.approx(4.0)
    assert d.should_cut(40, 12, 21, "t")
    # a trial at a steady pace that fits is not cut
    d.observe("u", seconds=12, fold_epochs=12, images_per_s=100)
    assert not d.should_cut(40, 12, 12, "u")


def test_deadline_budget_reserves_the_best_trials_refit():
    d = Deadline(full_fold_epochs=30, budget=600, predict_images=0, retrain=True)
    d.observe("slow", seconds=40, fold_epochs=10, images_per_s=50)  # 4 s / fold-epoch
    d.observe("fast", seconds=10, fold_epochs=10, images_per_s=200)  # 1 s / fold-epoch
    d.best = "fast"
    refit = 1 * 30 * REFIT_FACTOR * MARGIN + REFIT_FIXED_S
    assert d.refit_s() == pytest.approx(refit)
    assert d.end() == pytest.approx(600 - refit)
    # the best trial changes to the slow one: more time is reserved, the search ends sooner
    d.best = "slow"
    assert d.end() < 600 - refit


def test_deadline_refit_counts_test_predictions():
    d = Deadline(full_fold_epochs=30, budget=600, predict_images=10_000)
    d.observe("t", seconds=10, fold_epochs=10, images_per_s=100)
    d.best = "t"
    no_test = Deadline(full_fold_epochs=30, budget=600)
    no_test.observe("t", seconds=10, fold_epochs=10, images_per_s=100)
    no_test.best = "t"
    assert d.refit_s() > no_test.refit_s()


def test_deadline_timeout_and_budget_take_the_earlier_end():
    d = Deadline(full_fold_epochs=30, timeout=100, budget=1000)
    assert d.end() == 100


def test_deadline_running_trial_can_finish_only_before_the_end():
    d = Deadline(full_fold_epochs=36, timeout=100)
    assert d.can_finish(elapsed=50, seconds_left=50)
    assert not d.can_finish(elapsed=50, seconds_left=51)
    assert Deadline(full_fold_epochs=36).can_finish(1e9, 1e9)


def test_deadline_budget_reusing_models_reserves_only_the_predictions():
    d = Deadline(full_fold_epochs=30, budget=600, predict_images=8000)
    d.observe("t", seconds=10, fold_epochs=10, images_per_s=1000)
    d.best = "t"
    assert d.refit_s() == pytest.approx(8000 / 1000 * PREDICT_COST * MARGIN + REFIT_FIXED_S)
    assert d.refit_s() < replace(d, retrain=True).refit_s()


def test_deadline_cuts_a_trial_only_past_its_first_rung_and_when_it_cannot_finish():
    d = Deadline(full_fold_epochs=36, first_rung=3, timeout=100)
    # 1 fold-epoch in 10 s: 350 s left, far too long, but before the first rung: ASHA decides
    assert not d.should_cut(elapsed=50, fold_epochs=1, seconds=10)
    # at the first rung and still going: cut
    assert d.should_cut(elapsed=60, fold_epochs=3, seconds=30)
    # fast enough to finish: kept (33 fold-epochs x 1 s = 33 s left, 40 s to go)
    assert not d.should_cut(elapsed=60, fold_epochs=3, seconds=3)


def test_deadline_budget_reserves_the_final_models_target_epochs_at_the_pace():
    # final model: 3 folds x 24 epochs = 72 fold-epochs at the best trial's pace
    d = Deadline(full_fold_epochs=12, budget=600, search_share=0.25, final_fold_epochs=72)
    assert d.end() == pytest.approx(600 * 0.25)  # no pace yet: the most it may reserve
    d.observe("t", seconds=10, fold_epochs=10, images_per_s=1e9)  # 1 s per fold-epoch
    d.best = "t"
    final = 72 * REFIT_FACTOR * MARGIN + REFIT_FIXED_S + STOP_S
    assert d.final_s() == pytest.approx(final, rel=1e-6)
    assert d.end() == pytest.approx(600 - final, rel=1e-6)
    # a slow machine: the reserve is capped so the search keeps its least share
    d.observe("t", seconds=100, fold_epochs=10, images_per_s=1e9)
    assert d.end() == pytest.approx(600 * 0.25)
    # a full-data final model trains faster per fold-epoch (no held-out pass): less reserved
    full = replace(d, final_factor=FULL_FIT_FACTOR)
    full.observe("t", seconds=10, fold_epochs=10, images_per_s=1e9)
    want = 72 * FULL_FIT_FACTOR * MARGIN + REFIT_FIXED_S + STOP_S
    assert full.final_s() == pytest.approx(want, rel=1e-6) and want < final
    # share 1: no final model, only the refit's own time is reserved
    assert replace(d, search_share=1.0, final_fold_epochs=0).end() == pytest.approx(
        600 - d.refit_s()
    )


def test_final_epochs_fill_the_time_left_after_predictions():
    pace = Pace(seconds_per_fold_epoch=2.0, images_per_s=100)
    # 3 folds x 2 s x factor x margin per epoch, after predictions and the fixed cost
    per_epoch = 3 * 2.0 * REFIT_FACTOR * FINAL_MARGIN
    want = int((300 - 20 * MARGIN - REFIT_FIXED_S) // per_epoch)
    assert final_epochs(300, 3, pace, predict_s=20, cap=100) == want
    assert final_epochs(300, 3, pace, predict_s=20, cap=5) == 5
    assert final_epochs(5, 3, pace, predict_s=20, cap=12) == 0


def test_pick_final_takes_the_fastest_trial_within_the_tie_of_the_best():
    # (number, mean AUC, s per fold-epoch): 2 is the best; 1 is within 0.005 and 3x faster
    trials = [(0, 0.90, 1.0), (1, 0.936, 2.0), (2, 0.940, 6.0), (3, 0.930, 0.5)]
    assert pick_final(trials) == 1
    assert pick_final(trials, tie=0.0) == 2
    assert pick_final([(5, 0.8, 3.0)]) == 5


def test_deadline_guard_lets_the_first_budget_trial_finish_past_the_end():
    d = Deadline(full_fold_epochs=36, first_rung=3, budget=100, search_share=1.0)
    assert d.needs_guard()
    d.guard = "start"
    assert not d.needs_guard()
    d.observe("start", seconds=30, fold_epochs=3, images_per_s=100)  # far too slow to finish
    assert not d.should_cut(elapsed=200, fold_epochs=3, seconds=30, trial="start")
    # at the end every other trial is cut, but the run goes on while the guard runs
    assert d.should_cut(elapsed=200, fold_epochs=1, seconds=1, trial="other")
    assert d.expired(200) and not d.stop_all(200)
    # it ends without a value (e.g. ASHA pruned it): the next trial started is guarded
    d.finished("start", complete=False)
    assert d.needs_guard() and d.may_start(10_000) and d.stop_all(200)
    d.guard = "next"
    d.finished("next", complete=True)
    assert not d.needs_guard() and not d.may_start(10_000) and d.stop_all(200)


def test_deadline_guard_with_any_deadline_until_a_trial_is_complete():
    # a --timeout search finishes its start recipe too: without a COMPLETE trial the
    # users' flow (search, then pcam-refit) has nothing to submit
    assert Deadline(full_fold_epochs=36, timeout=100).needs_guard()
    assert Deadline(full_fold_epochs=36, budget=100).needs_guard()
    assert not Deadline(full_fold_epochs=36).needs_guard()  # no deadline: nothing is cut
    assert not Deadline(full_fold_epochs=36, budget=100, settled=True).needs_guard()
    assert not Deadline(full_fold_epochs=36, timeout=100, settled=True).needs_guard()


def test_deadline_starved_budget_stops_the_search_at_its_first_complete_trial():
    # final model 72 fold-epochs at 4 s each (x0.6 x1.15) = ~224 s > 75% of 200 s: starved
    d = Deadline(full_fold_epochs=12, budget=200, search_share=0.25, final_fold_epochs=72)
    d.observe("t", seconds=40, fold_epochs=10, images_per_s=1e9)
    assert d.starved()
    assert not d.expired(1) and d.may_start(1)  # nothing COMPLETE yet: the search goes on
    d.best = "t"
    d.finished("t", complete=True)
    assert d.expired(1) and not d.may_start(1) and d.reached
    # a budget large enough for the target epochs is not starved
    assert not replace(d, budget=2000).starved()


def test_full_fit_plan_gives_epochs_first_then_more_models():
    from search.tuning.deadline import MAX_FULL_MODELS, full_fit_plan

    pace = Pace(seconds_per_fold_epoch=1.0, images_per_s=1000.0)
    # one full-data epoch of k = 3 costs 1.5 fold-epochs: about half of 3 fold models' epoch
    n, e = full_fit_plan(300, 3, pace, predict_s=20, cap=1000, seed_epochs=1000)
    assert n == 1 and e == final_epochs(300, 1.5, pace, 20, cap=1000, factor=FULL_FIT_FACTOR)
    assert e >= 2 * final_epochs(300, 3, pace, 20, cap=1000, factor=FULL_FIT_FACTOR) - 1
    n, e = full_fit_plan(300, 3, pace, predict_s=20, cap=20, seed_epochs=20)  # 3 x 20 fit
    assert (n, e) == (MAX_FULL_MODELS, 20)
    n, e = full_fit_plan(40, 3, pace, predict_s=5, cap=20, seed_epochs=20)  # 1 < caps < 2
    assert n == 1 and e == 20
    assert full_fit_plan(5, 3, pace, predict_s=20, cap=20, seed_epochs=20) == (1, 0)


def test_full_fit_plan_shares_the_time_once_each_seed_gets_its_epochs():
    from search.tuning.deadline import full_fit_plan

    pace = Pace(seconds_per_fold_epoch=1.0, images_per_s=1000.0)
    # ~68 full-data epochs of one model fit (1.5 fold-epochs x FULL_FIT_FACTOR 0.5 x
    # FINAL_MARGIN 1.05 ~ 0.79 s each); two seeds pay a second prediction (~7 epochs' time)
    # and get 30 each, three would get 18 each
    one = final_epochs(70, 1.5, pace, predict_s=5, cap=1000, factor=FULL_FIT_FACTOR)
    n, e = full_fit_plan(70, 3, pace, predict_s=5, cap=1000, seed_epochs=24)
    assert n == 2 and e >= 24 and 2 * e <= one < 2 * (e + 1) + 10  # no time left over
    # fewer than two shares of seed_epochs: one model takes every epoch that fits
    assert full_fit_plan(70, 3, pace, predict_s=5, cap=1000, seed_epochs=e + 1) == (1, one)
    # the cap per model still holds, and an idle remainder is better than a 4th model
    assert full_fit_plan(1000, 3, pace, predict_s=5, cap=30, seed_epochs=24) == (3, 30)
