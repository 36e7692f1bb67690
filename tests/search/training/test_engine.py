import math
import pickle

import numpy as np
import pytest

from search.training.engine import PoolImages, TrainData, TrainParams, fold_steps, train_cv
from search.training.fold import lr_factor, resolve_device
from search.training.results import TrialDiverged, TrialOutOfMemory

TINY = {"crop": 32, "batch_size": 32, "lr": 3e-3, "width": 8}


@pytest.fixture(scope="module")
def embedded(cv_data):
    """The embedded dataset at a tiny size (1200 train patches), cached, with 3 slide folds."""
    return cv_data(1200, 3, seed=0, n_test=40)


def _small(embedded, n=96):
    data, folds = embedded
    rows = np.concatenate([np.flatnonzero(folds == f)[: n // 2] for f in (0, 1)])
    sub = TrainData(data.images[rows], data.labels[rows])
    return sub, folds[rows]


def _ensemble(states: list[dict], params: dict):
    """The fold models of ``states`` as a saved ensemble would load them (CPU)."""
    from search.common.ensemble import Ensemble

    return Ensemble.from_states(states, params, "cpu")


@pytest.mark.parametrize("arch", ["simple_cnn", "resnet18", "mobilenetv3_small_100"])
def test_train_cv_each_arch_trains_an_epoch(embedded, arch):
    data, folds = _small(embedded)
    r = train_cv({**TINY, "arch": arch, "batch_size": 16}, data, folds, epochs=1, threads=2)
    assert r.epochs_run == 1 and math.isfinite(r.final["train_loss"])
    assert r.device == resolve_device(None).type  # CUDA on a GPU host


def test_train_cv_lockstep_one_value_per_fold_per_epoch(embedded):
    data, folds = _small(embedded)
    seen = []
    r = train_cv(
        TINY, data, folds, device="cpu", epochs=2, on_epoch=lambda e, m: seen.append(e) and False
    )
    assert seen == [1, 2] and [h["epoch"] for h in r.history] == [1, 2]
    for h in r.history:
        assert len(h["auc_folds"]) == len(h["val_loss_folds"]) == len(h["acc_folds"]) == 2
        assert h["auc"] == pytest.approx(np.mean(h["auc_folds"]))


def test_train_cv_on_epoch_returning_true_stops_all_folds(embedded):
    data, folds = _small(embedded)
    r = train_cv(TINY, data, folds, device="cpu", epochs=5, on_epoch=lambda e, m: e >= 2)
    assert r.epochs_run == 2 and r.stopped_early


def test_train_cv_same_seed_same_fold_aucs(embedded):
    data, folds = _small(embedded)
    a = train_cv(TINY, data, folds, device="cpu", epochs=2, seed=3, threads=2)
    b = train_cv(TINY, data, folds, device="cpu", epochs=2, seed=3, threads=2)
    c = train_cv(TINY, data, folds, device="cpu", epochs=2, seed=4, threads=2)
    assert [h["auc_folds"] for h in a.history] == [h["auc_folds"] for h in b.history]
    assert [h["auc_folds"] for h in a.history] != [h["auc_folds"] for h in c.history]


def test_train_cv_keeps_states_and_out_of_fold_predictions(embedded):
    data, folds = _small(embedded)
    r = train_cv(TINY, data, folds, device="cpu", epochs=1, keep_states=True, keep_oof=True)
    assert len(r.states) == 2 and "fc.weight" in r.states[0]
    assert r.oof.shape == (len(folds),) and ((r.oof >= 0) & (r.oof <= 1)).all()


def test_train_cv_nonfinite_loss_raises_trial_diverged(embedded):
    data, folds = _small(embedded)
    bad = {**TINY, "optimizer": "sgd", "lr": 1e12, "warmup_epochs": 0}
    with pytest.raises(TrialDiverged, match="epoch 1") as e:
        train_cv(bad, data, folds, device="cpu", epochs=2)
    assert e.value.params["lr"] == 1e12


def test_train_cv_beats_auc_075_on_embedded_heldout_folds(embedded):
    # keeps the engine honest: a small CNN, 3 epochs, slide-grouped held-out folds
    data, folds = embedded
    r = train_cv(
        {"crop": 32, "batch_size": 64, "lr": 3e-3}, data, folds, device="cpu", epochs=3, threads=2
    )
    assert r.final["auc"] > 0.75, r.history


def test_train_params_from_dict_rejects_unknown_and_invalid():
    with pytest.raises(ValueError, match="unknown training params"):
        TrainParams.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="optimizer"):
        TrainParams.from_dict({"optimizer": "lamb"})
    with pytest.raises(ValueError, match="crop"):
        TrainParams.from_dict({"crop": 50})


def test_lr_factor_warms_up_then_cosine_decays():
    total, warm = 100, 10
    f = [lr_factor(s, warm, total) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:], strict=False))
    assert f[-1] < 0.01


def test_train_cv_cuda_oom_raises_trial_out_of_memory(embedded, monkeypatch):
    import torch

    import models

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(models, "create", oom)
    data, folds = _small(embedded)
    with pytest.raises(TrialOutOfMemory, match="out of memory") as e:
        train_cv({**TINY, "batch_size": 16}, data, folds, device="cpu", epochs=1)
    assert e.value.params["batch_size"] == 16


@pytest.mark.parametrize(
    "race, want",
    [
        # fold 0 alone at epoch 1, then fold 1 joins, then both per epoch
        (1, [(1, 1, 1), (1, 2, 2), (2, 2, 4), (3, 2, 6)]),
        # fold 0 alone for 2 epochs, then fold 1 catches up to epoch 2 in one step
        (2, [(1, 1, 1), (2, 1, 2), (2, 2, 4), (3, 2, 6)]),
        # lockstep
        (0, [(1, 2, 2), (2, 2, 4), (3, 2, 6)]),
    ],
)
def test_train_cv_race_reports_fold_0_first_then_catches_up(embedded, race, want):
    data, folds = _small(embedded)
    r = train_cv(TINY, data, folds, device="cpu", epochs=3, race_epochs=race)
    # (epoch, folds averaged, fold-epochs trained) per report
    assert [(h["epoch"], h["folds"], h["fold_epochs"]) for h in r.history] == want
    assert all(len(h["auc_folds"]) == h["folds"] for h in r.history)
    assert r.epochs_run == 3 and r.final["auc"] == pytest.approx(np.mean(r.final["auc_folds"]))


def test_fold_steps_race_then_lockstep():
    assert fold_steps(3, 4, 2) == [
        ([0], 1),
        ([0], 2),
        ([1], 2),
        ([2], 2),
        ([0, 1, 2], 3),
        ([0, 1, 2], 4),
    ]
    assert fold_steps(2, 2, 0) == [([0, 1], 1), ([0, 1], 2)]
    assert fold_steps(2, 1, 5) == [([0], 1), ([1], 1)]  # racing never passes the last epoch


@pytest.mark.parametrize("race", [1, 2])
def test_train_cv_race_stopped_at_fold_0_trains_nothing_else(embedded, race):
    # race == epochs: the stop comes at the last epoch, yet fold 1 must not train
    data, folds = _small(embedded)
    r = train_cv(
        TINY, data, folds, device="cpu", epochs=2, race_epochs=race, on_epoch=lambda e, m: True
    )
    assert r.stopped_early and len(r.history) == 1 and r.history[0]["fold_epochs"] == 1


def test_train_cv_race_changes_the_order_not_the_models(embedded):
    # each fold has its own seed, generator and schedule: racing reorders the work only
    # (dropout 0: dropout draws from torch's global RNG, which the order would change)
    data, folds = _small(embedded)
    p = {**TINY, "dropout": 0.0}
    lock = train_cv(p, data, folds, device="cpu", epochs=2, seed=1, threads=1)
    race = train_cv(p, data, folds, device="cpu", epochs=2, seed=1, threads=1, race_epochs=2)
    assert race.final["auc_folds"] == lock.final["auc_folds"]


def test_lr_factor_onecycle_rises_then_decays():
    total = 100
    f = [lr_factor(s, 0, total, "onecycle") for s in range(total)]
    peak = int(np.argmax(f))
    assert f[0] == pytest.approx(1 / 25) and f[peak] == pytest.approx(1.0, abs=1e-3)
    assert 20 <= peak <= 30 and f[-1] < 0.01
    assert lr_factor(50, 10, total, "constant") == 1.0


def test_train_params_rejects_unknown_schedule():
    with pytest.raises(ValueError, match="schedule"):
        TrainParams.from_dict({"schedule": "step"})


def test_pool_images_gather_rows_of_the_mapped_cache_without_copying_it(embedded, tmp_path):
    # from_cache keeps the patches in the cache's file; trials receive (path, rows) only
    data, _ = embedded
    pool = data.images
    assert isinstance(pool, PoolImages) and pool.shape == (len(data.labels), 96, 96, 3)
    whole = np.load(pool.path, mmap_mode="r")
    idx = np.array([5, 3, 900, 3, 0])
    assert np.array_equal(pool[idx], whole[pool.rows[idx]])  # any order, repeats allowed
    assert np.array_equal(pool[idx, 32:64, 32:64], whole[pool.rows[idx]][:, 32:64, 32:64])
    blob = pickle.dumps(pool)
    assert len(blob) < 20_000 < pool.shape[0] * 96 * 96 * 3 // 100
    again = pickle.loads(blob)
    assert np.array_equal(again[idx], pool[idx])
    gone = PoolImages(tmp_path / "missing" / "images.npy", pool.rows)
    with pytest.raises(FileNotFoundError, match="not readable on"):
        gone[idx]


def test_pool_images_signature_says_whether_a_hosts_file_holds_the_same_bytes(tmp_path):
    # what the Ray node check compares: another node's file at the driver's path
    path = tmp_path / "images.npy"
    np.save(path, np.zeros((4, 96, 96, 3), np.uint8))
    pool = PoolImages(path, np.arange(4))
    sig = pool.signature()
    assert PoolImages(path, np.arange(2)).signature() == sig  # rows do not matter
    np.save(path, np.ones((4, 96, 96, 3), np.uint8))  # same size, other bytes (tail)
    assert PoolImages(path, np.arange(4)).signature() != sig
    with pytest.raises(FileNotFoundError, match=r"missing.*not readable on"):
        PoolImages(tmp_path / "missing.npy", np.arange(4)).signature()


def test_train_cv_same_result_from_the_mapped_pool_and_from_ram(embedded):
    # gathering batches from the memory-mapped pool trains exactly as the same rows in RAM
    data, folds = embedded
    rows = np.concatenate([np.flatnonzero(folds == f)[:48] for f in (0, 1)])
    mapped = TrainData(PoolImages(data.images.path, data.images.rows[rows]), data.labels[rows])
    in_ram = TrainData(np.asarray(mapped.images), mapped.labels)
    a = train_cv(TINY, mapped, folds[rows], device="cpu", epochs=1, threads=1)
    b = train_cv(TINY, in_ram, folds[rows], device="cpu", epochs=1, threads=1)
    assert a.final["auc_folds"] == b.final["auc_folds"]


def test_saved_models_predict_what_training_scored_out_of_fold(embedded):
    # one inference path: the ensemble's one-view test prediction of fold model f on fold f's
    # held-out rows is the OOF that training scored (crop, normalisation, autocast shared)
    data, folds = _small(embedded)
    r = train_cv(
        TINY, data, folds, device="cpu", epochs=1, keep_states=True, keep_oof=True, threads=2
    )
    ens = _ensemble(r.states, TINY)
    per_model = ens.predict(data.images, tta=1, batch=40, per_model=True)
    for f in range(len(r.states)):
        held = folds == f
        np.testing.assert_allclose(per_model[f][held], r.oof[held], atol=1e-5)
    np.testing.assert_allclose(ens.predict_held_out(data.images, folds, tta=1), r.oof, atol=1e-5)
    # over the test's views: still each row from the one fold model that did not train on it
    views = ens.predict(data.images, tta=4, batch=40, per_model=True)
    want = views[folds, np.arange(len(folds))]
    np.testing.assert_allclose(ens.predict_held_out(data.images, folds, tta=4), want, atol=1e-5)
    assert np.abs(want - r.oof).max() > 1e-6  # the views do change the predictions
    from search.common.ensemble import EnsembleError

    with pytest.raises(EnsembleError, match="cannot score"):  # folds the models do not match
        ens.predict_held_out(data.images, np.where(folds == 0, 0, len(r.states)), tta=1)


def test_train_cv_in_cpu_bf16_trains_and_scores_finite(embedded, monkeypatch):
    # the bf16 path runs on any CPU (emulated where there is no AMX): training under autocast
    # gives finite losses and AUCs, and the weights stay fp32 (the saved models are fp32)
    import search.training.device as device

    monkeypatch.setattr(device, "cpu_bf16", lambda: True)
    monkeypatch.delenv(device.AMP_ENV, raising=False)
    device.amp_dtype.cache_clear()
    try:
        data, folds = _small(embedded)
        r = train_cv(
            TINY, data, folds, epochs=1, device="cpu", threads=2, keep_states=True, keep_oof=True
        )
    finally:
        device.amp_dtype.cache_clear()
    assert math.isfinite(r.final["train_loss"]) and all(map(math.isfinite, r.final["auc_folds"]))
    assert all(
        v.dtype.is_floating_point is False or str(v.dtype) == "torch.float32"
        for sd in r.states
        for v in sd.values()
    )
    assert np.isfinite(r.oof).all()


def test_train_cv_ema_scores_and_keeps_the_averaged_weights(embedded):
    # with ema on, what is scored and kept is the EMA of the weights: other weights than the
    # plain run's (same seed), the same ones the OOF was scored with, and ema=0 is the old path
    data, folds = _small(embedded)
    plain = train_cv(TINY, data, folds, device="cpu", epochs=2, threads=2, keep_states=True)
    ema = train_cv(
        {**TINY, "ema": 0.9},
        data,
        folds,
        device="cpu",
        epochs=2,
        threads=2,
        keep_states=True,
        keep_oof=True,
    )
    again = train_cv(
        {**TINY, "ema": 0.0}, data, folds, device="cpu", epochs=2, threads=2, keep_states=True
    )
    w = "features.0.weight"
    assert not np.allclose(plain.states[0][w].numpy(), ema.states[0][w].numpy())
    np.testing.assert_array_equal(plain.states[0][w].numpy(), again.states[0][w].numpy())
    assert plain.final["auc_folds"] != ema.final["auc_folds"]
    held_out = _ensemble(ema.states, {**TINY, "ema": 0.9}).predict_held_out(
        data.images, folds, tta=1
    )
    np.testing.assert_allclose(held_out, ema.oof, atol=1e-5)


def test_train_full_with_ema_returns_the_averaged_weights(embedded):
    from search.training.engine import train_full

    data, _ = _small(embedded)
    plain = train_full(TINY, data, device="cpu", epochs=2, threads=2)
    ema = train_full({**TINY, "ema": 0.9}, data, device="cpu", epochs=2, threads=2)
    w = "features.0.weight"
    assert not np.allclose(plain[0][w].numpy(), ema[0][w].numpy())


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2.0])
def test_train_params_refuses_an_ema_decay_outside_0_1(bad):
    with pytest.raises(ValueError, match="ema"):
        TrainParams.from_dict({"ema": bad})


@pytest.mark.parametrize(
    "done, planned, per_epoch, left, want",
    [
        (1, 48, 2.0, 200.0, 48),  # 47 more need 94 s: they fit
        (1, 48, 2.0, 50.0, 26),  # 25 more fit
        (10, 48, 2.0, 0.0, 11),  # none fits: one more, so the schedule still ends
        (10, 48, 2.0, -30.0, 11),  # already late: the same
        (48, 48, 2.0, -30.0, 48),  # done
    ],
)
def test_epochs_that_fit_shortens_only_what_would_run_late(done, planned, per_epoch, left, want):
    from search.training.engine import epochs_that_fit

    assert epochs_that_fit(done, planned, per_epoch, left) == want


def test_train_full_shortens_each_models_schedule_to_its_share_of_seconds(embedded):
    from search.training.engine import train_full

    data, _ = _small(embedded)
    seen = []
    states = train_full(
        TINY,
        data,
        device="cpu",
        epochs=5,
        seeds=[0, 1],
        threads=2,
        seconds=0.0,
        on_epoch=lambda *a: seen.append(a),
    )
    # no time at all: each model trains one epoch, then one more that ends its schedule
    assert seen == [(0, 1, 2), (0, 2, 2), (1, 1, 2), (1, 2, 2)] and len(states) == 2
    seen.clear()
    train_full(TINY, data, device="cpu", epochs=2, threads=2, on_epoch=lambda *a: seen.append(a))
    assert seen == [(0, 1, 2), (0, 2, 2)]  # no limit: as planned


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_fold_schedule_shortened_mid_run_still_anneals_to_its_new_end(schedule):
    # train_full's deadline sets Fold.epochs mid-run: the lr must follow the new length
    # (reach ~0 at its last step), not the planned one
    import torch

    from search.training.fold import Fold

    p = TrainParams.from_dict({**TINY, "schedule": schedule, "warmup_epochs": 0.5})
    fold = Fold(0, p, np.ones(320, np.int64), 8, 0, torch.device("cpu"), False)
    lam = fold.sched.lr_lambdas[0]
    last = 3 * fold.steps - 1  # the last step of 3 epochs
    assert lam(last) > 0.3  # on the planned 8 epochs, mid-schedule
    fold.epochs = 3
    assert lam(last) < 0.01 and lam(fold.steps) > 0.3


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd", "rmsprop"])
def test_optimizer_decays_conv_and_linear_weights_only(optimizer):
    from search.training.fold import _make_optimizer, _param_groups, create_model

    p = TrainParams(width=8, crop=32, optimizer=optimizer, weight_decay=1e-2)
    model = create_model(p)
    opt = _make_optimizer(p, _param_groups(p, model))
    decay_of = {id(q): g["weight_decay"] for g in opt.param_groups for q in g["params"]}
    for name, q in model.named_parameters():
        want = 1e-2 if q.ndim > 1 else 0.0  # BatchNorm scales and biases are not decayed
        assert decay_of[id(q)] == want, name
    if optimizer == "rmsprop":
        assert opt.defaults["alpha"] == 0.99  # torch's, not timm's 0.9
    # decay_norms: every param decayed, as before
    p2 = TrainParams(width=8, crop=32, optimizer=optimizer, weight_decay=1e-2, decay_norms=True)
    opt2 = _make_optimizer(p2, _param_groups(p2, create_model(p2)))
    assert {g["weight_decay"] for g in opt2.param_groups} == {1e-2}
