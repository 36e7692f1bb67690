import warnings

import optuna
import pytest

from search.common.defaults import SAMPLERS
from search.tuning.sampler import make_sampler


def _conditional(trial: optuna.Trial) -> float:
    arch = trial.suggest_categorical("arch", ["a", "b"])
    lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    width = trial.suggest_int("width", 8, 32) if arch == "a" else 16
    return lr * width


@pytest.mark.parametrize("name", SAMPLERS)
def test_make_sampler_runs_a_conditional_space_quietly(name):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an ExperimentalWarning would reach the user's console
        study = optuna.create_study(sampler=make_sampler(name, seed=0))
        study.optimize(_conditional, n_trials=14)
    assert len(study.trials) == 14
    # past the startup trials, only the multivariate sampler models parameters jointly
    relative = study.sampler.infer_relative_search_space(study, study.ask())
    assert bool(relative) == (name == "tpe-multivariate")


def test_make_sampler_same_seed_same_draws():
    draws = []
    for _ in range(2):
        study = optuna.create_study(sampler=make_sampler("tpe-multivariate", seed=3))
        study.optimize(_conditional, n_trials=12)
        draws.append([t.params for t in study.trials])
    assert draws[0] == draws[1]


def test_make_sampler_unknown_name_is_named():
    with pytest.raises(ValueError, match="'tpe-x'"):
        make_sampler("tpe-x", seed=0)
