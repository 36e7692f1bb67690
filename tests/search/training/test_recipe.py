"""Training-recipe options: early stopping, MixUp/CutMix (centre rule), focal loss, weighting."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from search.training.augment import centre_fraction, cutmix, mixup
from search.training.batches import normalise
from search.training.engine import TrainParams, train_cv
from search.training.fold import probabilities
from search.training.losses import binary_loss
from search.tuning.space import load_space, suggest

TINY = {"crop": 32, "batch_size": 32, "lr": 3e-3, "width": 8, "aug": 0.0}


def test_mixup_alpha_to_zero_is_no_mixup():
    torch.manual_seed(0)
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 2, (16,)).float()
    xm, ym = mixup(x, y, alpha=1e-4)
    # Beta(a, a) with a -> 0 puts lam at 0 or 1; the dominant image is kept: unchanged batch
    assert torch.allclose(xm, x, atol=1e-3) and torch.allclose(ym, y, atol=1e-3)


def test_centre_fraction_counts_only_the_centre():
    # 96 px patch: centre is [32, 64) x [32, 64)
    assert centre_fraction((0, 32, 0, 96), 96) == 0.0  # top ring only
    assert centre_fraction((32, 64, 32, 64), 96) == 1.0
    assert centre_fraction((32, 48, 0, 96), 96) == 0.5


def test_cutmix_box_outside_centre_keeps_label(monkeypatch):
    # a box pasted in the outer ring does not make a tumour patch: labels unchanged
    x = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 3, 96, 96).clone()
    y = torch.tensor([0.0, 1.0] * 4)
    monkeypatch.setattr(torch, "randint", lambda *a, **k: torch.tensor([8, 8]))  # top-left
    g = torch.Generator().manual_seed(0)
    checked = 0
    for _ in range(40):
        xm, ym = cutmix(x, y, alpha=0.2, generator=g)
        box = (xm != x).any(0).any(0)  # (H, W) pixels pasted anywhere in the batch
        if box.any() and not box[32:64, 32:64].any():  # the box stayed in the ring
            assert torch.equal(ym, y)
            checked += 1
    assert checked


def test_cutmix_box_over_centre_moves_label_by_covered_share(monkeypatch):
    # crop 32 = the centre itself: the label moves by the share of pixels pasted
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 32, 32).clone()
    y = torch.tensor([0.0, 1.0, 0.0, 1.0])
    monkeypatch.setattr(torch, "randint", lambda *a, **k: torch.tensor([16, 16]))  # centred
    xm, ym = cutmix(x, y, alpha=1.0, generator=torch.Generator().manual_seed(3))
    for i in range(4):
        pasted = xm[i, 0] != x[i, 0]
        share = float(pasted.float().mean())
        src = int(xm[i, 0][pasted][0]) if share else i  # partner's constant value = its index
        assert float(ym[i]) == pytest.approx((1 - share) * float(y[i]) + share * float(y[src]))


def test_focal_gamma_zero_is_bce():
    logits, target = torch.randn(64), torch.rand(64)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    assert torch.allclose(binary_loss(logits, target, "focal", gamma=0.0, alpha=-1), bce)
    # focusing lowers the loss of easy examples, so the mean drops
    assert binary_loss(logits, target, "focal", gamma=2.0) < bce


def test_pos_weight_scales_positive_terms():
    logits, target = torch.randn(32), torch.ones(32)
    assert torch.allclose(
        binary_loss(logits, target, pos_weight=2.0), 2 * binary_loss(logits, target)
    )


@pytest.fixture(scope="module")
def small(cv_data):
    return cv_data(600, 2, seed=1)


def test_patience_stops_and_restores_best_epoch(small):
    data, folds = small
    # lr 1e-9: nothing learns, so no epoch beats the first by MIN_DELTA -> patience 1 stops
    # every fold after epoch 2
    r = train_cv(
        {**TINY, "lr": 1e-9, "patience": 1, "restore_best": True},
        data,
        folds,
        device="cpu",
        epochs=6,
        threads=2,
        keep_states=True,
        keep_oof=True,
    )
    assert r.self_stopped and r.epochs_run == 2 and r.best_epochs == [1, 1]


def test_restore_best_keeps_the_best_epochs_weights(small):
    data, folds = small
    r = train_cv(
        {**TINY, "lr": 1e-2, "restore_best": True},
        data,
        folds,
        device="cpu",
        epochs=4,
        threads=2,
        keep_states=True,
        keep_oof=True,
    )
    import models

    p = TrainParams.from_dict({**TINY, "lr": 1e-2})
    for f in (0, 1):
        best = r.best_epochs[f]
        want = r.history[best - 1]["auc_folds"][f]
        m = models.create(p.arch, dropout=p.dropout, width=p.width, depth=p.depth)
        m.load_state_dict(r.states[f])
        m.eval()
        rows = np.flatnonzero(folds == f)
        x = torch.from_numpy(np.ascontiguousarray(data.images[rows, 32:64, 32:64]))
        x = x.permute(0, 3, 1, 2).float() / 255
        norm = models.data_config(m, p.arch)
        mean, std = (torch.tensor(norm[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
        with torch.no_grad():  # the one inference step (bf16 autocast where training used it)
            probs = probabilities(m, normalise(x, mean, std)).numpy()
        # the returned weights score exactly what the best epoch scored on that fold
        assert roc_auc_score(data.labels[rows], probs) == pytest.approx(want, abs=1e-6)
        # and the best-epoch OOF is those predictions
        assert roc_auc_score(data.labels[rows], r.oof_best[rows]) == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_train_cv_with_mixing_and_focal_runs(small, mix):
    data, folds = small
    r = train_cv(
        {**TINY, "mix": mix, "mix_prob": 1.0, "loss": "focal", "pos_weight": 1.5},
        data,
        folds,
        device="cpu",
        epochs=1,
        threads=2,
    )
    assert np.isfinite(r.final["auc"]) and np.isfinite(r.final["train_loss"])
    # the options took effect: the same seed without them trains to other weights
    plain = train_cv(TINY, data, folds, device="cpu", epochs=1, threads=2)
    assert r.final["train_loss"] != plain.final["train_loss"]
    assert r.final["auc_folds"] != plain.final["auc_folds"]


def test_extended_space_asks_conditionals_only_when_they_apply():
    space = load_space("extended")
    st = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(40):
        p = suggest(st.ask(), space)
        TrainParams.from_dict(p)
        assert ("focal_gamma" in p) == (p["loss"] == "focal")
        assert ("mix_alpha" in p) == (p["mix"] != "none")
        assert ("restore_best" in p) == (p["patience"] > 0)
