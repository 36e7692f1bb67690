"""Search (a few trials) -> refit -> ensemble + submission, end to end on small generated data."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState
from sklearn.metrics import roc_auc_score

from data_pipeline import DataConfig, open_dataset
from search.commands.refit import predict_main, refit_main
from search.commands.search_args import main as search_main
from search.common import study as studies
from search.common.attrs import MODELS_DIR, REFIT, get_record
from search.common.ensemble import EnsembleError, dihedral_views, load_ensemble
from search.submission.inputs import RefitError, pick_trial
from search.submission.outputs import submission_frame, write_csv_atomic

SPACE = """
[fixed]
arch = "simple_cnn"
width = 8
crop = 32
batch_size = 32
aug = 0.0

[params.lr]
type = "float"
low = 1e-3
high = 1e-2
log = true
"""


@pytest.fixture(scope="module")
def refitted(_kaggle_master, tmp_path_factory):
    """A 4-trial search, then ``pcam-refit --best``; returns (root, data folder)."""
    root = tmp_path_factory.mktemp("refit")
    (root / "space.toml").write_text(SPACE)
    common = ["--studies-dir", str(root / "studies"), "--cache-dir", str(root / "cache")]
    assert (
        search_main(
            [
                "--data",
                str(_kaggle_master),
                "--space",
                str(root / "space.toml"),
                "--trials",
                "4",
                "--max-epochs",
                "2",
                "--folds",
                "2",
                "--no-progress",
                *common,
            ]
        )
        == 0
    )
    assert refit_main(["--best", "--reuse", "--tta", "8", "--no-progress", *common]) == 0
    return root, _kaggle_master


def _refit_dir(root: Path) -> Path:
    (d,) = (root / "studies" / "pcam" / "refit").glob("trial-*")
    return d


def test_refit_submission_matches_sample_submission(refitted):
    root, data = refitted
    sub = pd.read_csv(_refit_dir(root) / "submission.csv", dtype={"id": str})
    sample = pd.read_csv(data / "sample_submission.csv", dtype={"id": str})
    # Kaggle: header id,label, every sample id once, in its order, probabilities
    assert list(sub.columns) == ["id", "label"]
    assert sub["id"].tolist() == sample["id"].tolist()
    assert sub["label"].between(0, 1).all() and sub["label"].nunique() > 1


def test_refit_uses_best_complete_trial_and_records_it(refitted):
    root, _ = refitted
    study = optuna.load_study(
        study_name="pcam", storage=studies.sqlite_url(root / "studies" / "pcam.db")
    )
    rec = get_record(study, "refit")
    assert rec["trial"] == studies.best_trial(study).number
    assert len(rec["oof_auc_folds"]) == 2
    # the embedded data has true test labels: the honesty gap can be measured
    assert rec["test_auc"] is not None
    # ... like for like too: each fold model alone, one view, against its own OOF fold
    assert len(rec["test_auc_folds"]) == 2
    assert rec["validation_minus_test"] == pytest.approx(
        np.mean(rec["oof_auc_folds"]) - np.mean(rec["test_auc_folds"])
    )
    oof = pd.read_csv(rec["oof_csv"])
    assert list(oof.columns) == ["id", "label", "fold", "prob"]
    assert oof["prob"].notna().all() and set(oof["fold"]) == {0, 1}
    # the recorded OOF AUC is the file's, overall and per fold
    assert rec["oof_auc"] == pytest.approx(roc_auc_score(oof["label"], oof["prob"]))
    for f, a in enumerate(rec["oof_auc_folds"]):
        d = oof[oof["fold"] == f]
        assert a == pytest.approx(roc_auc_score(d["label"], d["prob"]))


def test_ensemble_reload_gives_identical_predictions(refitted, tmp_path):
    root, data = refitted
    ens_dir = _refit_dir(root) / "ensemble"
    meta = json.loads((ens_dir / "ensemble.json").read_text())
    assert {
        "arch",
        "params",
        "norm",
        "crop",
        "folds_file",
        "dataset_fingerprint",
        "version",
    } <= set(meta)
    out = tmp_path / "preds.csv"  # not in the module's folder: other tests read it
    assert (
        predict_main(
            [
                str(data),
                "--ensemble",
                str(ens_dir),
                "--out",
                str(out),
                "--cache-dir",
                str(root / "cache"),
            ]
        )
        == 0
    )
    sub = pd.read_csv(_refit_dir(root) / "submission.csv", dtype={"id": str})
    again = pd.read_csv(out, dtype={"id": str})
    assert again["id"].tolist() == sub["id"].tolist()
    np.testing.assert_allclose(again["label"], sub["label"], rtol=0, atol=1e-6)


def test_ensemble_predict_per_model_averages_to_the_ensemble(refitted):
    root, _ = refitted
    ens = load_ensemble(_refit_dir(root) / "ensemble", "cpu")
    images = np.random.default_rng(0).integers(0, 256, (7, 96, 96, 3), dtype=np.uint8)
    each = ens.predict(images, tta=4, per_model=True)
    assert each.shape == (len(ens.models), 7)
    np.testing.assert_allclose(each.mean(0), ens.predict(images, tta=4), rtol=0, atol=1e-6)


def test_refit_refuses_to_overwrite_submission(refitted):
    root, _ = refitted
    common = ["--studies-dir", str(root / "studies"), "--cache-dir", str(root / "cache")]
    d = _refit_dir(root)
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    assert refit_main(["--best", "--no-progress", "--epochs", "1", *common]) == 2
    # refused before any work: the whole folder (ensemble, oof.csv, refit.json) is unchanged
    assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before


def test_load_ensemble_refuses_modified_weights(refitted, tmp_path):
    root, _ = refitted
    ens = Path(shutil.copytree(_refit_dir(root) / "ensemble", tmp_path / "ens"))
    blob = bytearray((ens / "fold0.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (ens / "fold0.safetensors").write_bytes(bytes(blob))
    with pytest.raises(EnsembleError, match="fold0.safetensors: contents differ"):
        load_ensemble(ens)


def test_load_ensemble_refuses_pickled_weights(refitted, tmp_path):
    root, _ = refitted
    ens = Path(shutil.copytree(_refit_dir(root) / "ensemble", tmp_path / "ens"))
    evil = pickle.dumps({"conv.weight": object()})  # a pickle, not safetensors
    (ens / "fold0.safetensors").write_bytes(evil)
    meta = json.loads((ens / "ensemble.json").read_text())
    meta["folds"][0]["sha256"] = hashlib.sha256(evil).hexdigest()  # even with a matching hash
    (ens / "ensemble.json").write_text(json.dumps(meta))
    with pytest.raises(EnsembleError, match="not a valid safetensors file"):
        load_ensemble(ens)


@pytest.mark.parametrize(
    "change, says",
    [
        (lambda m: m.update(folds=[]), "'folds' must be a non-empty list"),
        (lambda m: m.update(folds={"file": "fold0.safetensors"}), "'folds' must be a non-empty"),
        (lambda m: m["folds"][0].pop("sha256"), "'folds'[0] (fold0.safetensors) has no sha256"),
        (lambda m: m["folds"][1].pop("file"), "'folds'[1] has no 'file'"),
        (lambda m: m.pop("norm"), "'norm' must hold"),
        (lambda m: m["norm"].update(mean=[0.5]), "'norm' must hold"),
        (lambda m: m.update(params=[1, 2]), "'params' must be a table"),
    ],
)
def test_load_ensemble_names_a_malformed_ensemble_json(refitted, tmp_path, change, says):
    root, _ = refitted
    ens = Path(shutil.copytree(_refit_dir(root) / "ensemble", tmp_path / "ens"))
    meta = json.loads((ens / "ensemble.json").read_text())
    change(meta)
    (ens / "ensemble.json").write_text(json.dumps(meta))
    with pytest.raises(EnsembleError, match=re.escape(f"{ens / 'ensemble.json'}: {says}")):
        load_ensemble(ens)


def _fake_cache(tmp_path: Path, test_ids: list[str], sample_ids: list[str]):
    (tmp_path / "sample_submission.csv").write_text(
        "id,label\n" + "".join(f"{i},0\n" for i in sample_ids)
    )
    index = pd.DataFrame({"id": test_ids, "split": "test", "label": -1})
    return SimpleNamespace(index=index, meta={"source": str(tmp_path), "layout": "kaggle"})


def test_submission_frame_follows_sample_order(tmp_path):
    cache = _fake_cache(tmp_path, ["a", "b", "c"], ["c", "a", "b"])
    df = submission_frame(cache, np.array([0.1, 0.2, 0.3]), np.arange(3))
    assert df["id"].tolist() == ["c", "a", "b"]
    assert df["label"].tolist() == [0.3, 0.1, 0.2]


def test_submission_frame_mismatched_ids_named(tmp_path):
    cache = _fake_cache(tmp_path, ["a", "b", "x"], ["a", "b", "c"])
    with pytest.raises(RefitError, match=r"\['c'\].*\['x'\]"):
        submission_frame(cache, np.array([0.1, 0.2, 0.3]), np.arange(3))


def test_write_csv_atomic_needs_force(tmp_path):
    p = write_csv_atomic(pd.DataFrame({"id": ["a"], "label": [0.5]}), tmp_path / "s.csv", False)
    with pytest.raises(RefitError, match="--force"):
        write_csv_atomic(pd.DataFrame({"id": ["b"], "label": [0.1]}), p, False)
    assert p.read_text() == "id,label\na,0.5\n"


def test_pick_trial_refuses_pruned(tmp_path):
    st = optuna.create_study(direction="maximize")
    t = st.ask()
    t.report(0.9, 1)
    st.tell(t, state=TrialState.PRUNED)
    with pytest.raises(RefitError, match="no COMPLETE trial"):
        pick_trial(st, None)
    with pytest.raises(RefitError, match="trial 0 is PRUNED"):
        pick_trial(st, 0)


def test_dihedral_views_are_the_8_symmetries():
    x = torch_arange()
    views = dihedral_views(x, 8)
    # exactly the 8 symmetries of the square (numpy's rotations and their mirror images),
    # each once: a sorted-pixels check would pass for any shuffle of the pixels
    a = x[0, 0].numpy()
    want = {tuple(np.rot90(m, k).flatten().tolist()) for m in (a, a.T) for k in range(4)}
    flat = [tuple(v[0, 0].flatten().tolist()) for v in views]
    assert len(set(flat)) == 8 and set(flat) == want
    assert len(dihedral_views(x, 4)) == 4 and len(dihedral_views(x, 1)) == 1


def torch_arange():
    import torch

    return torch.arange(9, dtype=torch.float32).view(1, 1, 3, 3)


def test_refit_data_is_the_searched_data(refitted):
    root, data = refitted
    cache = open_dataset(DataConfig(data=data, cache_dir=root / "cache"), progress=False)
    meta = json.loads((_refit_dir(root) / "ensemble" / "ensemble.json").read_text())
    assert meta["dataset_fingerprint"] == cache.fingerprint


def test_refit_gap_scores_the_saved_best_epoch_weights(_kaggle_master, tmp_path):
    # with restore_best the ensemble keeps each fold's best epoch: the like-for-like gap must
    # compare those weights' held-out AUC (oof.csv) with their test AUC, not the last epoch's.
    # lr 1e-9 learns nothing: the held-out AUC only drifts with BatchNorm's running
    # statistics, so some fold's best epoch comes before its last (seeded: deterministic)
    space = SPACE.split("[params.lr]")[0].replace(
        "aug = 0.0", "aug = 0.0\nlr = 1e-9\npatience = 1\nrestore_best = true"
    )
    space += '[params.dropout]\ntype = "float"\nlow = 0.0\nhigh = 0.5\n'
    (tmp_path / "space.toml").write_text(space)
    common = ["--studies-dir", str(tmp_path / "studies"), "--cache-dir", str(tmp_path / "cache")]
    search = ["--data", str(_kaggle_master), "--space", str(tmp_path / "space.toml")]
    search += ["--trials", "2", "--max-epochs", "4", "--folds", "2", "--no-asha", "--no-progress"]
    assert search_main([*search, *common]) == 0
    assert refit_main(["--best", "--retrain", "--tta", "1", "--no-progress", *common]) == 0
    rec = json.loads(next((tmp_path / "studies").rglob("refit.json")).read_text())
    assert rec["trained"] is True and min(rec["best_epochs"]) < 4
    oof = pd.read_csv(rec["oof_csv"])
    saved = [roc_auc_score(g["label"], g["prob"]) for _, g in oof.groupby("fold")]
    assert saved != pytest.approx(rec["oof_auc_folds"])  # best epoch != last epoch here
    assert rec["validation_minus_test"] == pytest.approx(
        np.mean(saved) - np.mean(rec["test_auc_folds"])
    )


def test_refit_reuse_submits_the_searchs_fold_models_without_training(refitted):
    # the best trial's own fold models (saved by the search) are the submission: no training,
    # the same weights bit for bit, and its OOF AUC per fold is the trial's own value
    root, _ = refitted
    study = optuna.load_study(study_name="pcam", storage=f"sqlite:///{root / 'studies/pcam.db'}")
    best = study.best_trial
    rec = get_record(study, "refit")
    assert rec["trained"] is False and rec["trial"] == best.number
    saved = Path(best.user_attrs[MODELS_DIR])
    copied = _refit_dir(root) / "ensemble"
    for f in sorted(saved.glob("fold*.safetensors")):
        assert (copied / f.name).read_bytes() == f.read_bytes()
    assert np.mean(rec["oof_auc_folds"]) == pytest.approx(best.value, abs=1e-6)


def test_search_keeps_only_the_top_trials_models(_kaggle_master, tmp_path):
    (tmp_path / "space.toml").write_text(SPACE)
    common = ["--studies-dir", str(tmp_path / "studies"), "--cache-dir", str(tmp_path / "cache")]
    args = ["--data", str(_kaggle_master), "--space", str(tmp_path / "space.toml")]
    args += ["--trials", "4", "--max-epochs", "1", "--folds", "2", "--no-asha", "--no-progress"]
    assert search_main([*args, "--keep-top", "1", *common]) == 0
    study = optuna.load_study(
        study_name="pcam", storage=f"sqlite:///{tmp_path / 'studies/pcam.db'}"
    )
    kept = [p for p in (tmp_path / "studies/pcam/models").iterdir() if not p.name.startswith(".")]
    # one folder left, the best trial's; no half-written temp folder
    assert kept == [Path(study.best_trial.user_attrs[MODELS_DIR])]
    assert not list((tmp_path / "studies/pcam/models").glob(".*"))


def test_refit_full_trains_models_on_every_labelled_patch(refitted, tmp_path):
    # --full N: N models (seeds) on all labelled rows; no OOF of their own (nothing held
    # out), so the CV estimate written is the search's fold models' OOF of the same params.
    # A copy of the study: the module's fixture is not changed for the tests after this one
    root, data = refitted
    shutil.copytree(root / "studies", tmp_path / "studies")
    common = ["--studies-dir", str(tmp_path / "studies"), "--cache-dir", str(root / "cache")]
    args = ["--best", "--full", "2", "--epochs", "1", "--tta", "1", "--force", "--no-progress"]
    args += common
    assert refit_main(args) == 0
    (d,) = (tmp_path / "studies" / "pcam" / "refit").glob("trial-*")
    rec = json.loads((d / "refit.json").read_text())
    assert rec["full_fit"] == 2 and rec["trained"] and rec["validation_minus_test"] is None
    assert rec["epochs_trained"] == [1, 1]  # no deadline: every planned epoch
    meta = json.loads((d / "ensemble" / "ensemble.json").read_text())
    assert meta["full_fit"] and len(meta["folds"]) == 2 and not meta.get("oof")
    study = optuna.load_study(
        study_name="pcam", storage=f"sqlite:///{tmp_path / 'studies/pcam.db'}"
    )
    saved = Path(study.trials[rec["trial"]].user_attrs[MODELS_DIR])
    from search.common.ensemble import load_oof

    oof = pd.read_csv(d / "oof.csv")
    assert np.allclose(oof["prob"].to_numpy(), load_oof(saved), atol=1e-6)
    # pcam-predict loads the full-data models like any ensemble: the same submission
    out = tmp_path / "preds.csv"
    cmd = [str(data), "--ensemble", str(d / "ensemble"), "--out", str(out), "--tta", "1"]
    assert predict_main([*cmd, "--cache-dir", str(root / "cache")]) == 0
    a = pd.read_csv(out, dtype={"id": str})
    b = pd.read_csv(d / "submission.csv", dtype={"id": str})
    assert a["id"].tolist() == b["id"].tolist() and np.allclose(a["label"], b["label"], atol=1e-6)


def test_refit_full_models_end_by_train_until(refitted, tmp_path):
    # --budget's full-data models must end where the budget still fits predicting: with the
    # deadline already past, each trains one epoch, then one more to finish its (shortened)
    # schedule, and refit.json, the ensemble and the console say so
    import io
    import time

    from rich.console import Console

    from search.submission.inputs import RefitConfig
    from search.submission.refit import refit

    root, _ = refitted
    shutil.copytree(root / "studies", tmp_path / "studies")
    cfg = RefitConfig(
        epochs=4,
        full_models=2,
        train_until=time.monotonic() - 1,
        studies_dir=tmp_path / "studies",
        cache_dir=root / "cache",
        tta=1,
        force=True,
        progress=False,
    )
    out = io.StringIO()
    res = refit(cfg, Console(file=out, width=200))
    rec = json.loads((res.ensemble_dir.parent / "refit.json").read_text())
    assert rec["epochs"] == 4 and rec["epochs_trained"] == [2, 2]
    assert json.loads((res.ensemble_dir / "ensemble.json").read_text())["epochs_trained"] == [2, 2]
    assert "trained [2, 2] of the planned 4 epochs" in out.getvalue()
    assert res.test_auc is not None and np.isfinite(res.test_auc)


def test_refit_full_and_retrain_together_is_refused(capsys):
    assert refit_main(["--best", "--full", "--retrain"]) == 2
    assert "--full" in capsys.readouterr().err


def test_study_user_attrs_stay_short_big_records_elsewhere(refitted):
    # `optuna studies` printed one 2,824-character row: the config, space, runs and refit
    # records now live in the study's system attrs; the refit user attr is a short summary
    root, _ = refitted
    import subprocess
    import sys

    url = studies.sqlite_url(root / "studies" / "pcam.db")
    optuna_cli = Path(sys.executable).parent / "optuna"
    out = subprocess.run(
        [str(optuna_cli), "studies", "--storage", url], capture_output=True, text=True
    ).stdout
    rows = [ln for ln in out.splitlines() if "pcam" in ln]
    assert rows and max(len(r) for r in rows) < 1000, max(len(r) for r in rows)
    study = optuna.load_study(study_name="pcam", storage=url)
    summary = {"kind", "trial", "oof_auc", "test_auc", "full_fit", "record"}
    assert set(study.user_attrs[REFIT]) <= summary
    assert Path(study.user_attrs[REFIT]["record"]).name == "refit.json"
    assert get_record(study, "config")["folds"] == 2
    assert "fixed" in get_record(study, "space") and get_record(study, "runs")
    assert get_record(study, "refit")["test_auc_folds"]


def test_plan_final_trains_the_cap_without_a_time_limit():
    from search.submission.plan import plan_final

    plan = plan_final(3, 12, 48, 48, None, None, 1000, True)
    assert (plan.path, plan.models, plan.epochs) == ("full", 1, 48)
    assert "48 epochs" in plan.why


def test_plan_final_with_time_fits_epochs_then_seeds_then_reuses():
    from search.submission.plan import plan_final
    from search.tuning.deadline import Pace

    pace = Pace(seconds_per_fold_epoch=2.0, images_per_s=500.0)  # a trial's pace
    # ~30 fold-epochs' worth: fewer than the cap of 48, one model
    short = plan_final(3, 4, 48, 48, pace, 40.0, 1000, True)
    assert short.path == "full" and short.models == 1 and 4 < short.epochs < 48
    # time for two models of 48 epochs each: a second seed
    long = plan_final(3, 4, 48, 48, pace, 200.0, 1000, True)
    assert (long.path, long.models, long.epochs) == ("full", 2, 48)
    # no more than the search's epochs fit: its own fold models, when it kept them
    tiny = plan_final(3, 4, 48, 48, pace, 5.0, 1000, True)
    assert tiny.path == "reuse" and "no more than the search's 4 epochs" in tiny.why
    # ... and when it did not, the full-data model trains what it can (its end is hard)
    assert plan_final(3, 4, 48, 48, pace, 5.0, 1000, False).path == "full"


def test_refit_default_trains_on_every_labelled_patch_and_records_the_path(
    _kaggle_master, tmp_path, capsys
):
    # pcam-refit --best by default trains the best params on every labelled patch (at equal
    # compute better than the search's fold models); --reuse submits those fold models
    (tmp_path / "space.toml").write_text(SPACE)
    common = ["--studies-dir", str(tmp_path / "studies"), "--cache-dir", str(tmp_path / "cache")]
    args = ["--data", str(_kaggle_master), "--space", str(tmp_path / "space.toml")]
    args += ["--trials", "1", "--max-epochs", "1", "--folds", "2", "--no-asha", "--no-progress"]
    assert search_main([*args, *common]) == 0
    base = ["--best", "--tta", "1", "--no-progress", "--force", *common]
    assert refit_main([*base, "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "trained on all" in out and "why: --epochs 2" in out
    rec = json.loads(next((tmp_path / "studies").rglob("refit.json")).read_text())
    assert rec["path"] == "full" and rec["full_fit"] == 1 and rec["epochs_trained"] == [2]
    assert rec["test_auc"] is not None
    assert refit_main([*base, "--reuse"]) == 0
    rec = json.loads(next((tmp_path / "studies").rglob("refit.json")).read_text())
    assert rec["path"] == "reuse" and rec["trained"] is False
    # --time too short for more epochs than the search's: its fold models, and it says why
    assert refit_main([*base, "--time", "1"]) == 0
    out = capsys.readouterr().out
    assert "no more than the search's 1 epochs fit" in out
    rec = json.loads(next((tmp_path / "studies").rglob("refit.json")).read_text())
    assert rec["path"] == "reuse" and "--time" not in (rec["plan"] or "")


def test_refit_reuse_and_epochs_or_bad_time_are_refused(tmp_path, capsys):
    common = ["--studies-dir", str(tmp_path / "studies")]
    assert refit_main(["--best", "--reuse", "--epochs", "3", *common]) == 2
    assert "--reuse trains nothing" in capsys.readouterr().err
    assert refit_main(["--best", "--time", "0", *common]) == 2
    assert "--time must be > 0" in capsys.readouterr().err


def _copy_studies(root: Path, tmp_path: Path) -> list[str]:
    """The module's studies folder copied (tests here may not change it); the CLI flags."""
    shutil.copytree(root / "studies", tmp_path / "studies")
    return ["--studies-dir", str(tmp_path / "studies"), "--cache-dir", str(root / "cache")]


def _files(d: Path) -> dict:
    return {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file()}


def test_refit_to_another_out_refuses_to_replace_an_earlier_refit(refitted, tmp_path, capsys):
    root, _ = refitted
    common = _copy_studies(root, tmp_path)
    d = _refit_dir(tmp_path)
    before = _files(d)
    new = tmp_path / "new.csv"
    assert refit_main(["--best", "--reuse", "--out", str(new), "--no-progress", *common]) == 2
    assert "refit.json exists (an earlier refit); pass --force" in capsys.readouterr().err
    assert _files(d) == before and not new.exists()


def test_refit_interrupted_leaves_the_earlier_refit_whole(refitted, tmp_path, monkeypatch):
    # Ctrl-C after the new models and OOF are written, before the submission: the folder and
    # the study's record still describe the earlier refit, and no stage folder is left
    import search.submission.refit as refit_mod

    root, _ = refitted
    common = _copy_studies(root, tmp_path)
    d = _refit_dir(tmp_path)
    before = _files(d)
    url = studies.sqlite_url(tmp_path / "studies" / "pcam.db")
    record = get_record(optuna.load_study(study_name="pcam", storage=url), "refit")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(refit_mod, "_predict", interrupted)
    args = ["--best", "--retrain", "--epochs", "1", "--force", "--no-progress", *common]
    assert refit_main(args) == 130
    assert _files(d) == before
    assert get_record(optuna.load_study(study_name="pcam", storage=url), "refit") == record
    assert [p.name for p in d.parent.iterdir() if p.name.startswith(".")] == []


def test_refit_replaces_the_folder_as_a_whole(refitted, tmp_path):
    # --force with --out elsewhere: the trial's folder is the new refit, with no submission
    # of the old one left beside the new models; refit.json points to the new submission
    root, _ = refitted
    common = _copy_studies(root, tmp_path)
    d = _refit_dir(tmp_path)
    new = tmp_path / "new.csv"
    args = ["--best", "--reuse", "--out", str(new), "--force", "--no-progress", *common]
    assert refit_main(args) == 0
    assert not (d / "submission.csv").exists() and new.is_file()
    rec = json.loads((d / "refit.json").read_text())
    assert rec["submission"] == str(new) and rec["ensemble"] == str(d / "ensemble")
    assert Path(rec["oof_csv"]).parent == d


@pytest.mark.parametrize("case", ["folder", "exists"])
def test_predict_checks_out_before_any_work(refitted, tmp_path, monkeypatch, capsys, case):
    import search.commands.refit as cli_mod

    root, data = refitted
    out = tmp_path / "preds.csv"
    if case == "folder":
        out.mkdir()
    else:
        out.write_text("id,label\n")
    monkeypatch.setattr(cli_mod, "load_ensemble", lambda *a: pytest.fail("worked first"))
    ens = str(_refit_dir(root) / "ensemble")
    args = [str(data), "--ensemble", ens, "--out", str(out), "--cache-dir", str(root / "cache")]
    assert predict_main(args) == 2
    err = capsys.readouterr().err
    assert str(out) in err and ("is a folder" if case == "folder" else "exists") in err


def test_refit_json_prints_the_record_alone_on_stdout(refitted, tmp_path, capsys):
    root, _ = refitted
    common = _copy_studies(root, tmp_path)
    assert refit_main(["--best", "--reuse", "--force", "--json", "--no-progress", *common]) == 0
    out = capsys.readouterr().out.strip()
    rec = json.loads(out)  # stdout is the JSON line and nothing else
    assert rec["path"] == "reuse" and Path(rec["submission"]).is_file()


def test_top_trials_are_the_best_complete_with_distinct_params():
    from optuna.distributions import FloatDistribution

    from search.submission.refit_top import top_trials

    dist = {"lr": FloatDistribution(1e-4, 1e-1, log=True)}

    def made(number: int, lr: float, value: float | None, state=TrialState.COMPLETE):
        t = optuna.trial.create_trial(params={"lr": lr}, distributions=dist, value=value)
        if state != TrialState.COMPLETE:
            t = optuna.trial.create_trial(
                params={"lr": lr}, distributions=dist, state=state, intermediate_values={1: 0.99}
            )
        t.number = number
        return t

    trials = [
        made(0, 1e-3, 0.90),
        made(1, 2e-3, 0.95),
        made(2, 2e-3, 0.94),  # the same params again (a re-run): counted once
        made(3, 5e-3, 0.99, TrialState.PRUNED),  # never a pruned one
        made(4, 3e-3, 0.93),
    ]
    assert [t.number for t in top_trials(trials, 3)] == [1, 4, 0]
    assert [t.number for t in top_trials(trials, 1)] == [1]
    assert top_trials(trials[3:4], 2) == []


def test_refit_top_averages_the_best_configurations_models(refitted, tmp_path):
    # --top 2: each of the two best configurations refit in its own folder, then their saved
    # models averaged with equal weights; the submission is what pcam-predict gives with the
    # saved blend, and the record names the members
    root, data = refitted
    common = _copy_studies(root, tmp_path)
    assert (
        refit_main(["--best", "--top", "2", "--reuse", "--force", "--no-progress", *common]) == 0
    )
    study = optuna.load_study(
        study_name="pcam", storage=f"sqlite:///{tmp_path / 'studies/pcam.db'}"
    )
    rec = get_record(study, REFIT)
    best = sorted(
        (t for t in study.trials if t.state == TrialState.COMPLETE),
        key=lambda t: t.value,
        reverse=True,
    )[:2]
    assert rec["kind"] == "top" and rec["trials"] == [t.number for t in best]
    top = tmp_path / "studies/pcam/refit/top"
    assert json.loads((top / "refit.json").read_text()) == rec
    sub = pd.read_csv(top / "submission.csv", dtype={"id": str})
    sample = pd.read_csv(data / "sample_submission.csv", dtype={"id": str})
    assert sub["id"].tolist() == sample["id"].tolist()
    # the members' own submissions, averaged, are the blend's (same models, same views)
    members = [
        pd.read_csv(tmp_path / f"studies/pcam/refit/trial-{n}/submission.csv", dtype={"id": str})
        for n in rec["trials"]
    ]
    mean = np.mean([m.set_index("id").loc[sub["id"], "label"] for m in members], axis=0)
    np.testing.assert_allclose(sub["label"], mean, rtol=1e-5, atol=1e-6)
    # and pcam-predict with the saved blend writes the same submission
    out = tmp_path / "predicted.csv"
    assert predict_main([str(data), "--ensemble", rec["ensemble"], "--out", str(out)]) == 0
    np.testing.assert_allclose(pd.read_csv(out)["label"], sub["label"], rtol=1e-5, atol=1e-6)
    # the blend's CV estimate: the members' search out-of-fold probabilities averaged
    oof = pd.read_csv(rec["oof_csv"])
    assert rec["oof_auc"] == pytest.approx(roc_auc_score(oof["label"], oof["prob"]))
    # the report shows it
    from search.report import page

    assert page.main(["--studies-dir", str(tmp_path / "studies")]) == 0
    html = next((tmp_path / "studies").rglob("*.html")).read_text()
    assert "the 2 best configurations" in html


def test_refit_top_needs_best(capsys):
    assert refit_main(["--trial", "0", "--top", "2"]) != 0
    assert "--top M needs" in capsys.readouterr().err


def test_member_seconds_share_what_is_left_after_the_blend():
    from search.submission.refit_top import member_seconds

    # 600 s for 3 members, 30 s kept for the blend's predictions: 190 s each from the start
    assert member_seconds(600, 0, 30, 3) == pytest.approx(190)
    # the first took 250 s (more than its share): the other two split what is left
    assert member_seconds(600, 250, 30, 2) == pytest.approx(160)
    assert member_seconds(600, 620, 30, 1) == 1.0  # nothing left: the smallest refit
