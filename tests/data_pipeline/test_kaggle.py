"""One test per kind of bad input in the Kaggle layout: each must be named, none dropped."""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_pipeline import cache, kaggle
from data_pipeline.problems import DataError


def _kinds(problems):
    return {(p.kind, p.id) for p in problems}


def _first_train_ids(root: Path, k: int) -> list[str]:
    return pd.read_csv(root / "train_labels.csv", dtype=str)["id"].iloc[:k].tolist()


def test_scan_clean_dataset_has_no_problems(kaggle_dir):
    entries, problems = kaggle.scan(kaggle_dir)
    assert problems == []
    assert (entries["split"] == "train").sum() == 160
    assert (entries["split"] == "test").sum() == 40
    # test rows come in sample_submission order
    sub = pd.read_csv(kaggle_dir / "sample_submission.csv", dtype=str)
    assert entries.loc[entries.split == "test", "id"].tolist() == sub["id"].tolist()


def test_scan_partial_slide_map_leaves_unmapped_ids_empty(kaggle_dir):
    entries, _ = kaggle.scan(kaggle_dir)
    wsi = pd.read_csv(kaggle_dir / "patch_id_wsi.csv", dtype=str)
    train = entries[entries.split == "train"]
    mapped = train["id"].isin(wsi["id"])
    assert 0 < mapped.sum() < len(train)
    assert (train.loc[mapped, "slide"] != "").all()
    assert (train.loc[~mapped, "slide"] == "").all()


def test_scan_reports_id_in_csv_without_file(kaggle_dir):
    gone = _first_train_ids(kaggle_dir, 2)
    for i in gone:
        (kaggle_dir / "train" / f"{i}.tif").unlink()
    _, problems = kaggle.scan(kaggle_dir)
    assert {("missing_file", i) for i in gone} <= _kinds(problems)


def test_scan_reports_file_without_csv_row(kaggle_dir):
    src = next((kaggle_dir / "train").glob("*.tif"))
    (kaggle_dir / "train" / "stray0001.tif").write_bytes(src.read_bytes())
    _, problems = kaggle.scan(kaggle_dir)
    assert ("unlabelled_file", "stray0001") in _kinds(problems)


def test_scan_reports_labels_not_binary(kaggle_dir):
    df = pd.read_csv(kaggle_dir / "train_labels.csv", dtype=str)
    df.loc[0, "label"] = "2"
    df.loc[1, "label"] = "yes"
    df.to_csv(kaggle_dir / "train_labels.csv", index=False)
    _, problems = kaggle.scan(kaggle_dir)
    bad = [p for p in problems if p.kind == "bad_label"]
    assert {p.id for p in bad} == {df.id[0], df.id[1]}
    assert "'2'" in bad[0].detail or "'2'" in bad[1].detail


def test_scan_reports_duplicate_ids(kaggle_dir):
    df = pd.read_csv(kaggle_dir / "train_labels.csv", dtype=str)
    df = pd.concat([df, df.iloc[[3]]])
    df.to_csv(kaggle_dir / "train_labels.csv", index=False)
    _, problems = kaggle.scan(kaggle_dir)
    dups = [p for p in problems if p.kind == "duplicate_id"]
    # both rows of the repeated id are reported
    assert len(dups) == 2 and {p.id for p in dups} == {df.id.iloc[3]}


@pytest.mark.parametrize("header", ["image_id,label", "id,target", "id"])
def test_scan_misnamed_columns_is_fatal_error_naming_columns(kaggle_dir, header):
    df = pd.read_csv(kaggle_dir / "train_labels.csv", dtype=str)
    cols = header.split(",")
    df = df.iloc[:, : len(cols)]
    df.columns = cols
    df.to_csv(kaggle_dir / "train_labels.csv", index=False)
    with pytest.raises(DataError, match="missing column") as e:
        kaggle.scan(kaggle_dir)
    assert "train_labels.csv" in str(e.value)


def test_read_tiff_truncated_file_is_unreadable(kaggle_dir):
    ids = _first_train_ids(kaggle_dir, 1)
    path = kaggle_dir / "train" / f"{ids[0]}.tif"
    path.write_bytes(path.read_bytes()[:5000])
    problems = cache.check(kaggle_dir, workers=1, progress=False)
    hits = [p for p in problems if p.kind == "unreadable"]
    assert [p.id for p in hits] == ids
    assert str(path) in hits[0].path


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((64, 64, 3), np.uint8),
        np.zeros((96, 96), np.uint8),
        np.zeros((96, 96, 4), np.uint8),
    ],
    ids=["64x64", "grey", "rgba"],
)
def test_check_reports_wrong_size_or_mode(kaggle_dir, image):
    ids = _first_train_ids(kaggle_dir, 1)
    Image.fromarray(image).save(kaggle_dir / "train" / f"{ids[0]}.tif")
    problems = cache.check(kaggle_dir, workers=1, progress=False)
    hits = [p for p in problems if p.kind == "bad_shape"]
    assert [p.id for p in hits] == ids
    assert "expected 96x96 RGB" in hits[0].detail


def test_check_reports_exact_duplicate_images(kaggle_dir):
    a, b = _first_train_ids(kaggle_dir, 2)
    src = kaggle_dir / "train" / f"{a}.tif"
    (kaggle_dir / "train" / f"{b}.tif").write_bytes(src.read_bytes())
    problems = cache.check(kaggle_dir, workers=1, progress=False)
    dups = [p for p in problems if p.kind == "duplicate_image"]
    assert {p.id for p in dups} == {a, b}
    assert a in next(p.detail for p in dups if p.id == b)


def test_scan_test_folder_without_sample_submission_is_reported(kaggle_dir):
    (kaggle_dir / "sample_submission.csv").unlink()
    _, problems = kaggle.scan(kaggle_dir)
    assert [p.kind for p in problems] == ["missing_source"]


def test_scan_non_utf8_file_name_is_named_and_skippable(kaggle_dir, tmp_path):
    # a file name that is not valid UTF-8 must not abort check/build; it is reported with its
    # bytes escaped, and --skip-bad builds without it
    src = next((kaggle_dir / "train").glob("*.tif"))
    bad = os.path.join(os.fsencode(kaggle_dir / "train"), b"caf\xe9.tif")
    with open(bad, "wb") as f:
        f.write(src.read_bytes())
    _, problems = kaggle.scan(kaggle_dir)
    (p,) = [p for p in problems if p.kind == "bad_name"]
    assert p.path.endswith("caf\\xe9.tif")
    with pytest.raises(DataError, match="bad_name"):
        cache.build_cache(kaggle_dir, tmp_path / "c", workers=1, progress=False)
    c = cache.open_cache(kaggle_dir, tmp_path / "c2", skip_bad=True, workers=1, progress=False)
    assert c.meta["n"] == 200
