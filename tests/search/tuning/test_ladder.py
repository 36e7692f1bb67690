"""The growing top rung: which params train again, at which length, and how the search runs
them (a promoted trial is COMPLETE at its own length, untouched by ASHA)."""

from __future__ import annotations

import time

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from search.common.attrs import PROMOTED_FROM, TRIAL_EPOCHS
from search.tuning.ladder import Promotion, epochs_of, ladder, next_promotion

LR = {"lr": FloatDistribution(1e-4, 1e-1, log=True)}


def _trial(number: int, lr: float, value: float | None, epochs: int | None = None, **kw):
    attrs = {} if epochs is None else {TRIAL_EPOCHS: epochs}
    state = kw.pop("state", TrialState.COMPLETE)
    t = create_trial(
        state=state,
        value=value if state == TrialState.COMPLETE else None,
        params={"lr": lr},
        distributions=LR,
        user_attrs=attrs,
        **kw,
    )
    t.number = number
    return t


@pytest.mark.parametrize(
    ("base", "top", "want"),
    [(12, 48, [12, 24, 48]), (4, 48, [4, 8, 16, 32]), (24, 96, [24, 48, 96]), (12, 12, [12])],
)
def test_ladder_doubles_up_to_the_final_length(base, top, want):
    assert ladder(base, top) == want


def test_next_promotion_waits_for_eta_complete_trials_per_promoted_one():
    trials = [_trial(0, 1e-3, 0.90), _trial(1, 2e-3, 0.95)]
    assert next_promotion(trials, 12, 48, eta=3) is None
    trials.append(_trial(2, 3e-3, 0.93))
    assert next_promotion(trials, 12, 48, eta=3) == Promotion({"lr": 2e-3}, 24, 1)
    # one is running at 24 epochs: the next needs 6 COMPLETE at 12, and takes the next best
    trials.append(_trial(3, 2e-3, None, 24, state=TrialState.RUNNING))
    assert next_promotion(trials, 12, 48, eta=3) is None
    trials += [_trial(4, 4e-3, 0.80), _trial(5, 5e-3, 0.70), _trial(6, 6e-3, 0.60)]
    assert next_promotion(trials, 12, 48, eta=3) == Promotion({"lr": 3e-3}, 24, 2)


def test_next_promotion_counts_only_complete_trials_and_skips_params_already_queued():
    pruned = [_trial(i, 1e-3 * (i + 1), None, state=TrialState.PRUNED) for i in range(5)]
    assert next_promotion(pruned, 12, 48, eta=3) is None  # ASHA stopped them: never promoted
    done = [_trial(10 + i, 1e-2 * (i + 1), 0.9 + 0.01 * i) for i in range(3)]
    # a promotion queued but not yet asked: its params are Optuna's fixed_params
    waiting = create_trial(
        state=TrialState.WAITING,
        user_attrs={TRIAL_EPOCHS: 24},
        system_attrs={"fixed_params": {"lr": 3e-2}},
    )
    got = next_promotion(pruned + done + [waiting], 12, 48, eta=3)
    assert got is None  # 3 COMPLETE allow one trial at 24 epochs, and it is queued


def test_next_promotion_serves_the_longest_length_first():
    base = [_trial(i, 1e-3 * (i + 1), 0.90 + 0.001 * i) for i in range(9)]
    longer = [_trial(20 + i, 1e-3 * (i + 1), 0.95 + 0.001 * i, 24) for i in range(3)]
    got = next_promotion(base + longer, 12, 48, eta=3)
    assert got == Promotion({"lr": 3e-3}, 48, 22)  # the best 24-epoch trial, to 48 epochs
    assert epochs_of(longer[0], 12) == 24 and epochs_of(base[0], 12) == 12


def test_next_promotion_none_when_the_ladder_has_one_length():
    trials = [_trial(i, 1e-3 * (i + 1), 0.9) for i in range(10)]
    assert next_promotion(trials, 12, 12, eta=3) is None


def _searcher(storage, promote_to: int):
    from search.tuning.deadline import Deadline
    from search.tuning.progress import Tally
    from search.tuning.ray_adapter.searcher import _TrialRegistry, _TruthfulSearch

    return _TruthfulSearch(
        space=lambda trial: {"lr": trial.suggest_float("lr", 1e-4, 1e-1, log=True)},
        metric="auc",
        mode="max",
        study_name="s",
        storage=storage,
        max_epochs=12,
        full_fold_epochs=36,
        deadline=Deadline(full_fold_epochs=36),
        t0=time.monotonic(),
        stopped_early=set(),
        registry=_TrialRegistry(),
        tally=Tally(target=50),
        driver={},
        promote_to=promote_to,
        eta=3,
    )


@pytest.mark.parametrize("promote_to", [48, 0])
def test_searcher_gives_a_promoted_trial_its_length_in_the_config(tmp_path, promote_to):
    pytest.importorskip("ray")
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    for i, v in enumerate((0.90, 0.95, 0.93)):
        study.add_trial(_trial(i, 1e-3 * (i + 1), v))
    searcher = _searcher(optuna.storages.RDBStorage(url), promote_to)
    config = searcher.suggest("a")
    assert isinstance(config, dict)
    asked = study.trials[-1]
    if promote_to:  # the best of three COMPLETE, again at twice the epochs
        assert config == {"lr": 2e-3, TRIAL_EPOCHS: 24}
        assert asked.user_attrs[TRIAL_EPOCHS] == 24 and asked.user_attrs[PROMOTED_FROM] == 1
    else:  # --no-promote: an ordinary sampled trial
        assert set(config) == {"lr"} and TRIAL_EPOCHS not in asked.user_attrs


def test_search_runs_promoted_trials_to_their_own_length_past_asha(tmp_path):
    pytest.importorskip("ray")
    from search.common import study as studies
    from search.training.engine import TrainData
    from search.tuning import ray_adapter
    from search.tuning.deadline import Deadline
    from search.tuning.progress import Tally

    url = studies.sqlite_url(tmp_path / "s.db")
    storage = studies.make_storage(url)
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    k, n = 2, 14
    folds = np.arange(8) % k
    run = ray_adapter.SearchRun(
        study=study,
        storage=storage,
        space_fn=lambda t: {"lr": t.suggest_float("lr", 1e-4, 1e-1, log=True)},
        sampler=optuna.samplers.RandomSampler(seed=0),
        n_trials=n,
        settings=ray_adapter.TrialSettings(
            max_epochs=1, seed=0, threads=1, pretrained=False, race_epochs=0
        ),
        resources=ray_adapter.Resources(1, 0, 1),
        grace_period=1,
        reduction_factor=2,  # ASHA's max_t: 2 fold-epochs; the ladder: 1, 2, 4 epochs
        promote_to=4,
        driver=studies.driver_id(),
        storage_path=str(tmp_path / "ray"),
        trainable=ray_adapter.noop_trainable,
    )
    ray_adapter.init_ray(None, 1, 0, verbose=False)
    try:
        data = TrainData(np.zeros((8, 96, 96, 3), np.uint8), folds)
        ray_adapter.run_trials(run, data, folds, Deadline(full_fold_epochs=k), Tally(target=n))
    finally:
        ray_adapter.shutdown_ray()
    trials = optuna.load_study(study_name="s", storage=url).trials
    promoted = [t for t in trials if TRIAL_EPOCHS in t.user_attrs]
    assert {epochs_of(t, 1) for t in promoted} == {2, 4}
    for t in promoted:
        source = trials[t.user_attrs[PROMOTED_FROM]]
        assert t.state == TrialState.COMPLETE and t.params == source.params
        assert epochs_of(source, 1) * 2 == epochs_of(t, 1) and source.state == TrialState.COMPLETE
        # every epoch reported: ASHA (max_t 2 fold-epochs) did not stop it
        assert max(t.intermediate_values) == k * t.user_attrs[TRIAL_EPOCHS]
    best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert best.user_attrs.get(TRIAL_EPOCHS) == 4  # made-up AUCs rise with epochs
