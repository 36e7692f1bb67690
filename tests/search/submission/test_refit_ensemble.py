"""pcam-refit --ensemble: greedy selection over the search's kept fold models, end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from search.commands.refit import predict_main, refit_main
from search.commands.search_args import main as search_main
from search.common.attrs import get_record
from search.common.ensemble import Ensemble, EnsembleError, WeightedEnsemble, load_ensemble

SPACE = """
[fixed]
arch = "simple_cnn"
crop = 32
batch_size = 32
aug = 0.0

[params.lr]
type = "float"
low = 1e-3
high = 1e-2
log = true

[params.width]
type = "categorical"
choices = [8, 16]
"""


@pytest.fixture(scope="module")
def selected(_kaggle_master, tmp_path_factory):
    """A 5-trial search (every trial COMPLETE, models kept), a retrained refit of the best
    trial, then ``pcam-refit --ensemble 4``; returns (root, common args, record)."""
    root = tmp_path_factory.mktemp("ens")
    (root / "space.toml").write_text(SPACE)
    common = ["--studies-dir", str(root / "studies"), "--cache-dir", str(root / "cache")]
    args = ["--data", str(_kaggle_master), "--space", str(root / "space.toml"), "--no-asha"]
    args += ["--trials", "5", "--max-epochs", "2", "--folds", "2", "--no-progress", *common]
    assert search_main(args) == 0
    retrain = ["--best", "--retrain", "--epochs", "3", "--tta", "1", "--no-progress", *common]
    assert refit_main(retrain) == 0
    assert refit_main(["--ensemble", "4", "--tta", "4", "--no-progress", *common]) == 0
    study = optuna.load_study(study_name="pcam", storage=f"sqlite:///{root / 'studies/pcam.db'}")
    return root, common, get_record(study, "refit")


def test_refit_ensemble_selects_weighted_members_that_beat_the_best_alone(selected):
    _, _, rec = selected
    assert rec["kind"] == "ensemble" and not rec["trained"]
    # 4 kept trials + the retrained final model are the candidates
    assert len(rec["candidates"]) == 5
    assert any("retrained, 3 epochs" in c["label"] for c in rec["candidates"])
    assert sum(m["weight"] for m in rec["members"]) == pytest.approx(1.0)
    assert rec["oof_auc"] >= max(c["oof_auc"] for c in rec["candidates"]) - 1e-12
    assert rec["oof_auc"] == max(rec["selection_curve"])
    assert 0.5 < rec["nested_auc"] <= 1.0 and len(rec["nested_fold_aucs"]) == 2
    # the OOF file is the blend the record scores
    oof = pd.read_csv(rec["oof_csv"])
    assert roc_auc_score(oof["label"], oof["prob"]) == pytest.approx(rec["oof_auc"])
    assert all(m["test_auc"] is not None for m in rec["members"])
    assert rec["validation_minus_test"] is not None


def test_refit_ensemble_selects_on_oof_over_the_test_views(selected):
    root, _, rec = selected
    assert rec["oof_views"] == 4  # --tta 4: the OOF is predicted over the test's 4 views
    # the same fold models on the same held-out rows, one view (saved by the search) vs four
    assert any(c["oof_auc"] != c["search_oof_auc"] for c in rec["candidates"])
    cached = list((root / "studies/pcam/refit/test-cache").glob("*-oof-tta4.npy"))
    assert len(cached) == len(rec["candidates"])
    # the estimate of a test AUC is the mean left-out fold AUC; pooled is kept beside it
    assert rec["nested_auc"] == pytest.approx(np.mean(rec["nested_fold_aucs"]))
    assert 0.5 < rec["nested_pooled_auc"] <= 1.0


def test_refit_ensemble_submission_is_what_pcam_predict_gives(selected, _kaggle_master, tmp_path):
    root, common, rec = selected
    sub = pd.read_csv(rec["submission"])
    sample = pd.read_csv(_kaggle_master / "sample_submission.csv")
    assert list(sub["id"]) == list(sample["id"])
    out = tmp_path / "pred.csv"
    assert isinstance(load_ensemble(rec["ensemble"]), WeightedEnsemble)
    args = [str(_kaggle_master), "--ensemble", rec["ensemble"], "--out", str(out), "--tta", "4"]
    assert predict_main([*args, "--cache-dir", str(root / "cache")]) == 0
    np.testing.assert_allclose(pd.read_csv(out)["label"], sub["label"], atol=1e-5)


def test_refit_ensemble_again_reads_member_predictions_from_the_cache(selected, monkeypatch):
    root, common, rec = selected

    def no_inference(*a, **k):
        raise AssertionError("a member's test predictions were computed again")

    monkeypatch.setattr(Ensemble, "predict", no_inference)
    args = ["--ensemble", "4", "--tta", "4", "--no-progress", "--force", *common]
    assert refit_main(args) == 0
    again = pd.read_csv(rec["submission"])
    assert again["label"].notna().all()


def test_refit_ensemble_refuses_to_overwrite_before_any_work(selected, capsys):
    root, common, rec = selected
    before = Path(rec["oof_csv"]).stat().st_mtime_ns
    assert refit_main(["--ensemble", "4", "--no-progress", *common]) == 2
    assert "exists (an earlier refit); pass --force" in capsys.readouterr().err
    assert Path(rec["oof_csv"]).stat().st_mtime_ns == before


def test_refit_ensemble_needs_no_training_flags(selected, capsys):
    _, common, _ = selected
    assert refit_main(["--ensemble", "4", "--retrain", *common]) == 2
    assert "trains nothing" in capsys.readouterr().err


def test_load_ensemble_refuses_a_member_outside_its_folder(selected, tmp_path):
    _, _, rec = selected
    copy = tmp_path / "ens"
    shutil.copytree(rec["ensemble"], copy)
    meta = json.loads((copy / "ensemble.json").read_text())
    meta["members"][0]["dir"] = "../../elsewhere"
    (copy / "ensemble.json").write_text(json.dumps(meta))
    with pytest.raises(EnsembleError, match="points outside"):
        load_ensemble(copy)


def test_load_ensemble_names_a_corrupt_ensemble_json(selected, tmp_path):
    _, _, rec = selected
    member = tmp_path / "m"
    shutil.copytree(Path(rec["ensemble"]) / "member-0", member)
    (member / "ensemble.json").write_text("{not json")
    with pytest.raises(EnsembleError, match=str(member / "ensemble.json")):
        load_ensemble(member)
    meta_ok = json.loads((Path(rec["ensemble"]) / "member-0" / "ensemble.json").read_text())
    meta_ok["folds"][0]["file"] = "/etc/passwd"
    (member / "ensemble.json").write_text(json.dumps(meta_ok))
    with pytest.raises(EnsembleError, match="points outside"):
        load_ensemble(member)


def test_pcam_predict_requires_the_data_folder(capsys):
    with pytest.raises(SystemExit) as e:
        predict_main(["--ensemble", "x", "--out", "y.csv"])
    assert e.value.code == 2 and "data" in capsys.readouterr().err


def test_refit_on_flipped_labels_is_refused_unless_other_data_is_said(
    _kaggle_master, tmp_path, capsys
):
    # following the old advice (--data <the same folder>) skipped the check: now the content
    # is always compared, and different data is an explicit, recorded choice
    data = tmp_path / "data"
    shutil.copytree(_kaggle_master, data)
    (tmp_path / "space.toml").write_text(SPACE)
    common = ["--studies-dir", str(tmp_path / "studies"), "--cache-dir", str(tmp_path / "cache")]
    args = ["--data", str(data), "--space", str(tmp_path / "space.toml"), "--no-asha"]
    assert (
        search_main(
            [*args, "--trials", "1", "--max-epochs", "1", "--folds", "2", "--no-progress", *common]
        )
        == 0
    )
    labels = pd.read_csv(data / "train_labels.csv", dtype=str)
    labels.loc[:29, "label"] = labels.loc[:29, "label"].map({"0": "1", "1": "0"})
    labels.to_csv(data / "train_labels.csv", index=False)
    refit = ["--best", "--reuse", "--no-progress", "--tta", "1", "--data", str(data), *common]
    assert refit_main(refit) == 2
    assert "--other-data" in capsys.readouterr().err
    assert refit_main([*refit, "--other-data"]) == 0
    study = optuna.load_study(
        study_name="pcam", storage=f"sqlite:///{tmp_path / 'studies/pcam.db'}"
    )
    assert get_record(study, "refit")["other_data"] is True


def test_refit_prints_the_report_and_kaggle_submit_commands(selected, capsys):
    root, common, rec = selected
    assert refit_main(["--ensemble", "4", "--tta", "4", "--no-progress", "--force", *common]) == 0
    out = capsys.readouterr().out
    studies_dir = (root / "studies").resolve()
    assert f"pcam-report --study pcam --studies-dir {studies_dir}" in out
    assert (
        "kaggle competitions submit -c histopathologic-cancer-detection -f "
        f"{rec['submission']}" in out
    )


def test_refit_ensemble_labels_a_copied_refit_as_the_trials_own_models(tmp_path):
    from search.submission.refit_ensemble import _refit_label

    folder = tmp_path / "trial-3" / "ensemble"
    folder.mkdir(parents=True)
    (folder.parent / "refit.json").write_text(json.dumps({"trained": False}))
    assert _refit_label(folder, 3, 4) == "trial 3 (its search fold models, copied by a refit)"
    (folder.parent / "refit.json").write_text(json.dumps({"trained": True}))
    assert _refit_label(folder, 3, 12) == "trial 3 retrained, 12 epochs"
