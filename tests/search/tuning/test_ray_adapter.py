"""The Ray adapter's model sink: kept fold models reach the driver's disk from any node."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import models
from search.common.attrs import FAIL_REASON
from search.common.ensemble import (
    EnsembleError,
    ensemble_files,
    load_ensemble,
    load_oof,
    write_files,
)
from search.training.engine import TrainParams

P = TrainParams(arch="simple_cnn", width=8, depth=2, crop=32)


def _files(k: int = 2) -> tuple[dict, np.ndarray]:
    m = models.create(P.arch, width=P.width, depth=P.depth, dropout=P.dropout)
    states = [{n: v.clone() for n, v in m.state_dict().items()} for _ in range(k)]
    norm = models.data_config(m, P.arch)
    meta = {"params": P.__dict__, "norm": {"mean": norm["mean"], "std": norm["std"]}}
    oof = np.linspace(0, 1, 10, dtype=np.float32)
    return ensemble_files(states, meta, oof), oof


def test_ensemble_files_written_load_with_their_hashes(tmp_path):
    files, oof = _files()
    folder = write_files(tmp_path / "t1", files)
    ens = load_ensemble(folder, torch.device("cpu"))
    assert len(ens.models) == 2
    np.testing.assert_array_equal(load_oof(folder), oof)
    # a replaced folder is whole: no temp folder is left beside it
    write_files(tmp_path / "t1", files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t1"]


def test_write_files_refuses_a_name_outside_the_folder(tmp_path):
    with pytest.raises(EnsembleError, match="refusing"):
        write_files(tmp_path / "t", {"../x.safetensors": b"0"})
    assert not (tmp_path / "x.safetensors").exists()


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def test_model_sink_writes_what_a_remote_task_sends(local_ray, tmp_path):
    # The trial side holds no path: it sends bytes to the actor pinned to the driver's node,
    # which is the one that writes (on a cluster without a shared disk, the only way there)
    from search.tuning.ray_adapter import start_sink

    ray = local_ray
    sink = start_sink(str(tmp_path / "models"))
    files, oof = _files(3)

    @ray.remote(num_cpus=1)
    def trial(sink, files):  # what a trial on another node does
        return ray.get(sink.put.remote("trial_0001", files))

    path = ray.get(trial.remote(sink, files))
    assert path == str(tmp_path / "models" / "trial_0001")
    assert len(load_ensemble(path, torch.device("cpu")).models) == 3
    np.testing.assert_array_equal(load_oof(path), oof)
    with pytest.raises(ray.exceptions.RayTaskError, match="bad trial id"):
        ray.get(sink.put.remote("../escape", files))
    assert not (tmp_path / "escape").exists()
    ray.kill(sink)


def test_check_internals_passes_on_the_pinned_versions():
    from search.tuning import ray_adapter

    ray_adapter.check_internals()  # raises InternalsChanged naming the attribute otherwise


def test_check_internals_names_a_missing_private_attribute(monkeypatch):
    from ray.tune.schedulers import ASHAScheduler

    from search.tuning import ray_adapter

    real_init = ASHAScheduler.__init__

    def renamed(self, *a, **k):
        real_init(self, *a, **k)
        del self._max_t  # as if a Ray release renamed it

    monkeypatch.setattr(ASHAScheduler, "__init__", renamed)
    with pytest.raises(ray_adapter.InternalsChanged, match=r"ASHAScheduler\._max_t is gone"):
        ray_adapter.check_internals()


def test_save_models_on_a_full_disk_is_a_disk_full_error_naming_the_folder(tmp_path, monkeypatch):
    import errno
    from types import SimpleNamespace

    from search.training.fold import create_model
    from search.tuning import ray_adapter
    from search.tuning.outcome import TrialError, classify
    from search.tuning.ray_adapter import trial

    p = TrainParams(width=8, crop=32)
    states = [create_model(p).state_dict() for _ in range(2)]
    res = SimpleNamespace(states=states, oof=np.zeros(4), oof_best=None, device="cpu")
    models_dir = tmp_path / "models"
    settings = ray_adapter.TrialSettings(
        max_epochs=1, seed=0, threads=1, pretrained=False, models_dir=str(models_dir)
    )

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trial, "write_files", full)
    config = {"arch": "simple_cnn", "width": 8, "crop": 32}
    with pytest.raises(ray_adapter.DiskFullError) as e:
        trial._save_models(config, 1, res, settings, "t1")
    assert f"no space left on the disk of {models_dir}" in str(e.value)
    # not the params' fault: interrupted (run again on resume), with the message as reason
    out = classify(
        fold_epochs=6,
        full_fold_epochs=6,
        value=0.8,
        error=TrialError("DiskFullError", str(e.value), "search.tuning.ray_adapter.trial"),
    )
    assert out.interrupted and out.attrs[FAIL_REASON] == str(e.value)


def test_deadline_stopper_ends_the_run_when_rays_own_process_died():
    pytest.importorskip("ray")
    from search.tuning.deadline import Deadline
    from search.tuning.progress import Tally
    from search.tuning.ray_adapter.searcher import _DeadlineStopper

    alive = _DeadlineStopper(Deadline(full_fold_epochs=4), 0.0, Tally(target=3))
    assert not alive.stop_all() and not alive.tally.halted
    tally = Tally(target=3)
    dead = _DeadlineStopper(Deadline(full_fold_epochs=4), 0.0, tally, lambda: ["raylet"])
    assert dead.stop_all()
    assert "raylet died" in tally.halted and "run again first" in tally.halted


def test_searcher_waits_while_its_waste_share_is_taken_and_ends_when_nothing_runs(tmp_path):
    pytest.importorskip("ray")
    import time

    import optuna

    from search.tuning.deadline import MARGIN, Deadline
    from search.tuning.progress import Tally
    from search.tuning.ray_adapter.searcher import _TrialRegistry, _TruthfulSearch

    storage = f"sqlite:///{tmp_path / 's.db'}"
    optuna.create_study(study_name="s", storage=storage, direction="maximize")
    # 1 s per fold-epoch, 12 a trial, first rung 3; no full trial fits, a first rung does,
    # and the running trial "a" (which cannot finish) holds the whole waste share
    d = Deadline(full_fold_epochs=12, first_rung=3, timeout=200, settled=True)
    d.observe("done", seconds=100, fold_epochs=100, images_per_s=100)
    elapsed = 200 - 12 * MARGIN + 1
    d.started("a", elapsed)
    tally = Tally(target=50)
    searcher = _TruthfulSearch(
        space=lambda trial: {"lr": trial.suggest_float("lr", 1e-4, 1e-1, log=True)},
        metric="auc",
        mode="max",
        study_name="s",
        storage=optuna.storages.RDBStorage(storage),
        max_epochs=4,
        full_fold_epochs=12,
        deadline=d,
        t0=time.monotonic() - elapsed,
        stopped_early=set(),
        registry=_TrialRegistry(),
        tally=tally,
        driver={},
    )
    tally.running[0] = 1  # "a"
    assert searcher.suggest("b") is None and not d.reached  # ask again when "a" ends
    d.finished("a", complete=False)  # pruned at its first rung: the share is free again
    assert isinstance(searcher.suggest("b"), dict) and "b" in d.running
    d.cut.add("b")
    d.observe("b", seconds=6, fold_epochs=6, images_per_s=100)  # stopped: 6 fold-epochs lost
    d.finished("b", complete=False)
    tally.running.clear()
    assert searcher.suggest("c") == searcher.FINISHED and d.reached and d.not_started == 1
