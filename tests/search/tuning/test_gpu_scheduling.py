"""Ray's GPU scheduling, tested without a GPU: Ray accepts logical GPUs (``num_gpus=1`` on a
CPU machine), so fractional trials, their GPU ids and the no-CUDA error are real here."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from search.commands.search_config import trials_at_once
from search.common import study as studies
from search.common.attrs import ERROR_MESSAGE, ERROR_TYPE
from search.training.engine import TrainData
from search.tuning.deadline import Deadline
from search.tuning.progress import Tally

GPU_SHARE = 0.25


@pytest.mark.parametrize(("share", "want"), [(0.2, 5), (0.25, 4), (0.33, 3), (0.5, 2), (1, 1)])
def test_trials_at_once_exact_for_fractional_gpus(share, want):
    # 1 // 0.2 == 4.0 in floats: a floored division loses the fifth trial
    assert trials_at_once(64, 1, 1, share) == want
    assert trials_at_once(64, 2, 1, share) == 2 * want
    # CPUs bound it too
    assert trials_at_once(3, 1, 1, share) == min(3, want)


def test_trials_at_once_cpu_only():
    assert trials_at_once(16, 0, 1, 0) == 16 and trials_at_once(2, 0, 4, 0) == 0


def test_worker_env_forwards_the_project_settings_only():
    from search.tuning.ray_adapter import worker_env

    env = {"PCAM_AMP": "off", "PCAM_CACHE_DIR": "/c", "HOME": "/root", "PATH": "/bin"}
    assert worker_env(env) == {"PCAM_AMP": "off", "PCAM_CACHE_DIR": "/c"}


def test_trial_device_gpu_without_cuda_names_the_node():
    from search.tuning.ray_adapter import NoCudaError, trial_device

    assert trial_device([], False, "abc") == "cpu"
    assert trial_device([0], True, "abc") == "cuda"
    with pytest.raises(NoCudaError, match="node abc123.*no CUDA device"):
        trial_device([0], False, "abc123")


@pytest.fixture(scope="module")
def logical_gpu_ray():
    """A private Ray instance declaring 4 CPUs and one logical GPU; PCAM_PROBE set before it
    starts goes to its workers through ``init_ray``."""
    pytest.importorskip("ray")
    from search.tuning import ray_adapter

    os.environ["PCAM_PROBE"] = "from-the-driver"
    try:
        res = ray_adapter.init_ray(None, 4, 1, verbose=False)
        yield res
    finally:
        os.environ.pop("PCAM_PROBE", None)
        ray_adapter.shutdown_ray()


def _run(tmp_path: Path, trainable, n_trials: int, concurrency: int, name: str) -> optuna.Study:
    """``n_trials`` trials of ``trainable`` at ``GPU_SHARE`` of a GPU each, via run_trials."""
    from search.tuning import ray_adapter

    url = studies.sqlite_url(tmp_path / "s.db")
    storage = studies.make_storage(url)
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
    data = TrainData(np.zeros((8, 96, 96, 3), np.uint8), np.arange(8) % 2)
    run = ray_adapter.SearchRun(
        study=study,
        storage=storage,
        space_fn=lambda t: {"lr": t.suggest_float("lr", 1e-4, 1e-2, log=True)},
        sampler=optuna.samplers.RandomSampler(seed=0),
        n_trials=n_trials,
        settings=ray_adapter.TrialSettings(
            max_epochs=1, seed=0, threads=1, pretrained=False, race_epochs=0, gpu_share=GPU_SHARE
        ),
        resources=ray_adapter.Resources(1, GPU_SHARE, concurrency),
        grace_period=1,
        reduction_factor=2,
        asha=False,
        driver=studies.driver_id(),
        storage_path=str(tmp_path / "ray"),
        verbose=False,
        trainable=trainable,
    )
    ray_adapter.run_trials(
        run, data, np.arange(8) % 2, Deadline(full_fold_epochs=2), Tally(target=n_trials)
    )
    return optuna.load_study(study_name=name, storage=url)


def test_quarter_gpu_trials_run_four_at_once_each_with_its_gpu(logical_gpu_ray, tmp_path):
    # each trial waits until 4 trials have started: with fewer at once the 4th never comes
    # and they time out (recorded as FAIL with the reason)

    n = trials_at_once(logical_gpu_ray["CPU"], logical_gpu_ray["GPU"], 1, GPU_SHARE)
    assert n == 4
    rendezvous = tmp_path / "started"
    rendezvous.mkdir()

    def trainable(config, data, folds, settings):
        import ray
        from ray import tune

        ctx = tune.get_context()
        (rendezvous / ctx.get_trial_id()).touch()
        t_end = time.time() + 90
        while len(list(rendezvous.iterdir())) < 4 and time.time() < t_end:
            time.sleep(0.05)
        tune.report(
            {
                "auc": 0.5,
                "epoch": 1,
                "fold_epochs": 2,
                "folds": 2,
                "together": len(list(rendezvous.iterdir())),
                "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
                "visible": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                "probe": os.environ.get("PCAM_PROBE", ""),
            }
        )

    from search.tuning.ray_adapter import searcher

    seen = []
    real = searcher._TruthfulSearch.on_trial_complete

    def spy(self, trial_id, result=None, error=False):
        seen.append(dict(result or {}))
        return real(self, trial_id, result, error)

    searcher._TruthfulSearch.on_trial_complete = spy
    try:
        st = _run(tmp_path, trainable, 4, n, "quarter")
    finally:
        searcher._TruthfulSearch.on_trial_complete = real
    assert [t.state for t in st.trials] == [TrialState.COMPLETE] * 4
    assert len(seen) == 4
    for r in seen:
        assert r["together"] == 4  # all four ran at once on the one GPU
        assert r["gpu_ids"] == ["0"] and r["visible"] == "0"  # each sees the GPU it shares
        assert r["probe"] == "from-the-driver"  # the driver's PCAM_* settings reached it


def test_trial_given_a_gpu_without_cuda_fails_naming_the_node(logical_gpu_ray, tmp_path):
    # the real trainable on a logical GPU: this machine's torch has no CUDA device
    from search.tuning.ray_adapter.trial import _trainable

    st = _run(tmp_path, _trainable, 1, 1, "nocuda")
    (t,) = st.trials
    assert t.state == TrialState.FAIL
    assert t.user_attrs[ERROR_TYPE] == "NoCudaError"
    msg = t.user_attrs[ERROR_MESSAGE]
    assert "gave this trial GPU [0] on node" in msg and "finds no CUDA device" in msg
    import ray

    assert ray.get_runtime_context().get_node_id()[:12] in msg
