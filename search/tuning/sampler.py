"""The Optuna sampler of a search, by name (``--sampler``)."""

from __future__ import annotations

import warnings

import optuna

from search.common.defaults import SAMPLERS


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """TPE as ``--sampler`` names it, seeded; constant_liar in both, since Ray runs trials in
    parallel and a liar keeps new suggestions away from the running ones."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}")
    multivariate = name == "tpe-multivariate"
    with warnings.catch_warnings():
        # multivariate/group/constant_liar are marked experimental in Optuna: stable enough
        # for us (pinned below the next major), and the warning would fill a user's console
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed, constant_liar=True, multivariate=multivariate, group=multivariate
        )
