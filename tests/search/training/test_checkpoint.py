import numpy as np
import pytest
import torch

from search.training import checkpoint as ckpt
from search.training.engine import TrainData, train_cv
from search.training.fold import Fold

# every source of randomness a fold has: dropout, augmentation, MixUp, EMA, racing
PARAMS = {
    "crop": 32,
    "batch_size": 32,
    "lr": 3e-3,
    "width": 8,
    "dropout": 0.3,
    "aug": 0.5,
    "mix": "mixup",
    "mix_prob": 0.5,
    "ema": 0.9,
    "restore_best": True,
}
EPOCHS, RACE = 3, 1  # fold_steps(3, 3, 1): fold 0 at 1, folds 1 and 2 at 1, then 2 and 3


@pytest.fixture(autouse=True)
def every_report(monkeypatch):
    monkeypatch.setenv(ckpt.SHARE_ENV, "1")  # a checkpoint after every report, however slow


@pytest.fixture(scope="module")
def small(cv_data):
    data, folds = cv_data(300, 3, seed=0, n_test=10)
    return TrainData(np.asarray(data.images), data.labels), folds


class _Killed(Exception):
    """Stands in for the process dying right after a report."""


def _train(small, path=None, on_epoch=None, **kw):
    data, folds = small
    return train_cv(
        PARAMS,
        data,
        folds,
        epochs=EPOCHS,
        race_epochs=RACE,
        device="cpu",
        threads=1,
        keep_oof=True,
        keep_states=True,
        on_epoch=on_epoch,
        checkpoint=path,
        **kw,
    )


def _count_epochs(monkeypatch) -> list[int]:
    trained = []
    real = Fold.train_epoch

    def counting(self, run):
        trained.append((self.f, self.epoch + 1))
        return real(self, run)

    monkeypatch.setattr(Fold, "train_epoch", counting)
    return trained


@pytest.mark.parametrize("kill_after", [1, 3])  # during the race; at the first lockstep step
def test_train_cv_resumed_from_checkpoint_trains_no_epoch_twice_and_ends_the_same(
    small, tmp_path, monkeypatch, kill_after
):
    whole = _train(small)
    path = tmp_path / "trial.pt"
    reports = []

    def dies(epoch, m):
        reports.append(m)
        if len(reports) == kill_after:
            raise _Killed
        return False

    trained = _count_epochs(monkeypatch)
    with pytest.raises(_Killed):
        _train(small, path, dies)
    before = list(trained)
    trained.clear()
    seen = []
    resumed = _train(small, path, lambda e, m: seen.append(m) and False)
    # the saved reports are replayed, then training goes on: the curve is whole ...
    assert [m["fold_epochs"] for m in seen] == [m["fold_epochs"] for m in whole.history]
    assert [
        {k: v for k, v in m.items() if k != ckpt.RESUMED} for m in seen[:kill_after]
    ] == reports
    # every report of the resumed run says where it resumed
    assert {m[ckpt.RESUMED] for m in seen} == {reports[-1]["fold_epochs"]}
    # ... and no (fold, epoch) is trained twice
    assert not set(before) & set(trained)
    assert sorted(before + trained) == sorted((f, e) for f in range(3) for e in range(1, 4))
    # the same result as the run that was never stopped, bit for bit on the CPU
    assert resumed.history[-1]["auc_folds"] == whole.history[-1]["auc_folds"]
    np.testing.assert_array_equal(resumed.oof, whole.oof)
    for a, b in zip(resumed.states, whole.states, strict=True):
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_train_cv_replayed_report_can_stop_the_trial(small, tmp_path):
    path = tmp_path / "trial.pt"

    def dies(epoch, m):
        raise _Killed

    with pytest.raises(_Killed):
        _train(small, path, dies)
    r = _train(small, path, lambda e, m: True)  # a scheduler stops it on the replayed report
    assert r.stopped_early and len(r.history) == 1


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", None])
def test_train_cv_unusable_checkpoint_starts_from_scratch(small, tmp_path, content):
    path = tmp_path / "trial.pt"
    if content is None:  # another schedule's checkpoint: not this trial's
        data, folds = small
        train_cv(PARAMS, data, folds, epochs=1, device="cpu", threads=1, checkpoint=path)
    else:
        path.write_bytes(content)
    r = _train(small, path)
    assert [m["epoch"] for m in r.history] == [m["epoch"] for m in _train(small).history]


def test_checkpoint_key_differs_with_what_the_trial_trains():
    base = ckpt.checkpoint_key({"lr": 0.1}, seed=0, epochs=4)
    assert base == ckpt.checkpoint_key({"lr": 0.1}, epochs=4, seed=0)
    assert base != ckpt.checkpoint_key({"lr": 0.2}, seed=0, epochs=4)
    assert base != ckpt.checkpoint_key({"lr": 0.1}, seed=1, epochs=4)
