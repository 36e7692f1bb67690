import json
import os

import numpy as np
import pandas as pd
import pytest

from data_pipeline import cache, kaggle
from data_pipeline.problems import DataError


def test_build_cache_matches_decoded_tiffs(kaggle_dir, cache_root):
    c = cache.open_cache(kaggle_dir, cache_root, workers=2, progress=False)
    assert c.images.shape == (200, 96, 96, 3) and c.images.dtype == np.uint8
    assert isinstance(c.images, np.memmap)
    for r in (0, 77, 180):
        row = c.index.iloc[r]
        assert np.array_equal(
            c.images[r], kaggle.read_tiff(kaggle_dir / row.split / f"{row.id}.tif")
        )
    assert list(c.index.columns) == ["id", "label", "split", "slide", "hash", "source"]
    # the held-out test split keeps its labels from test_labels.csv; pool = labelled train
    assert len(c.labelled_pool()) == 160
    assert c.meta["layout"] == "kaggle" and c.meta["skipped"] == 0


def test_build_cache_is_reused_until_source_changes(kaggle_dir, cache_root):
    first = cache.build_cache(kaggle_dir, cache_root, workers=1, progress=False)
    mtime = (first / "images.npy").stat().st_mtime_ns
    assert cache.build_cache(kaggle_dir, cache_root, workers=1, progress=False) == first
    assert (first / "images.npy").stat().st_mtime_ns == mtime  # not rebuilt
    # change the source: one label flips -> new fingerprint -> rebuild, stale cache removed
    df = pd.read_csv(kaggle_dir / "train_labels.csv", dtype=str)
    df.loc[0, "label"] = "1" if df.loc[0, "label"] == "0" else "0"
    df.to_csv(kaggle_dir / "train_labels.csv", index=False)
    os.utime(kaggle_dir / "train_labels.csv", ns=(1, 1))  # mtime surely differs
    second = cache.build_cache(kaggle_dir, cache_root, workers=1, progress=False)
    assert second != first and not first.exists()
    assert cache.load_cache(second).index.label.iloc[0] == int(df.loc[0, "label"])


def test_build_cache_interrupted_leaves_nothing_that_loads(kaggle_dir, cache_root, monkeypatch):
    calls = {"n": 0}
    real = cache._decode_task

    def dying(task):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt  # as Ctrl-C mid-decode
        return real(task)

    monkeypatch.setattr(cache, "_decode_task", dying)
    with pytest.raises(KeyboardInterrupt):
        cache.build_cache(kaggle_dir, cache_root, workers=1, progress=False)
    # no cache folder and no temp folder survive
    assert not [p for p in cache_root.iterdir() if p.name != "unpacked"]


def test_build_cache_abandoned_temp_folder_of_killed_build_is_removed(kaggle_dir, cache_root):
    cache_root.mkdir(parents=True)
    dead = cache_root / ".building-x-kaggle-abc-999999999"  # pid that cannot exist
    (dead).mkdir()
    (dead / "images.npy").write_bytes(b"half")
    cache.build_cache(kaggle_dir, cache_root, workers=1, progress=False)
    assert not dead.exists()


def test_build_cache_stops_on_problems_naming_count_and_ids(kaggle_dir, cache_root):
    ids = pd.read_csv(kaggle_dir / "train_labels.csv", dtype=str)["id"].iloc[:3].tolist()
    for i in ids:
        (kaggle_dir / "train" / f"{i}.tif").unlink()
    with pytest.raises(DataError) as e:
        cache.build_cache(kaggle_dir, cache_root, workers=1, progress=False)
    msg = str(e.value)
    assert "3 missing_file" in msg and ids[0] in msg and "--skip-bad" in msg
    assert not cache_root.exists() or not list(cache_root.glob("*/meta.json"))


def test_build_cache_skip_bad_writes_report_with_reasons(kaggle_dir, cache_root):
    ids = pd.read_csv(kaggle_dir / "train_labels.csv", dtype=str)["id"].iloc[:4].tolist()
    (kaggle_dir / "train" / f"{ids[0]}.tif").unlink()  # missing_file
    p = kaggle_dir / "train" / f"{ids[1]}.tif"
    p.write_bytes(p.read_bytes()[:3000])  # unreadable
    # ids[2] and ids[3] become exact duplicates (same label?) -> kept or skipped by label rule
    (kaggle_dir / "train" / f"{ids[3]}.tif").write_bytes(
        (kaggle_dir / "train" / f"{ids[2]}.tif").read_bytes()
    )
    c = cache.open_cache(kaggle_dir, cache_root, skip_bad=True, workers=2, progress=False)
    report = pd.read_csv(c.path / "report.csv", dtype=str, keep_default_na=False)
    by_id = {r.id: r for r in report.itertuples()}
    assert by_id[ids[0]].kind == "missing_file" and by_id[ids[0]].action == "skipped"
    assert by_id[ids[1]].kind == "unreadable" and by_id[ids[1]].action == "skipped"
    labels = pd.read_csv(kaggle_dir / "train_labels.csv", dtype=str).set_index("id")["label"]
    agree = labels[ids[2]] == labels[ids[3]]
    assert by_id[ids[3]].action == ("kept" if agree else "skipped")
    kept = set(c.index.id)
    assert ids[0] not in kept and ids[1] not in kept
    assert (ids[3] in kept) == agree
    assert c.meta["skipped"] == 200 - len(c.index)
    assert c.images.shape[0] == len(c.index)


def test_check_builds_nothing(kaggle_dir, cache_root):
    assert cache.check(kaggle_dir, cache_root, workers=1, progress=False) == []
    assert not list(cache_root.glob("*/images.npy"))


def test_detect_layout_unknown_folder_says_what_was_expected(tmp_path):
    (tmp_path / "stuff.txt").write_text("x")
    with pytest.raises(DataError, match="train_labels.csv.*camelyonpatch"):
        cache.detect_layout(tmp_path)


def test_load_cache_refuses_incomplete_folder(kaggle_dir, cache_root):
    path = cache.build_cache(kaggle_dir, cache_root, workers=1, progress=False)
    meta = json.loads((path / "meta.json").read_text())
    (path / "index.csv").write_text("id,label,split,slide,hash,source\n")
    with pytest.raises(DataError, match="rebuild"):
        cache.load_cache(path)
    assert meta["n"] == 200


def test_cache_fingerprint_is_content_not_file_times(kaggle_dir, cache_root):
    # a touch rebuilds the stat-keyed folder but the dataset fingerprint is the same; one
    # flipped label changes it
    first = cache.open_cache(kaggle_dir, cache_root, workers=1, progress=False)
    tif = next((kaggle_dir / "train").glob("*.tif"))
    os.utime(tif, (1, 1))
    touched = cache.open_cache(kaggle_dir, cache_root, workers=1, progress=False)
    assert touched.path != first.path and touched.fingerprint == first.fingerprint
    labels = pd.read_csv(kaggle_dir / "train_labels.csv", dtype=str)
    labels.loc[0, "label"] = "1" if labels.loc[0, "label"] == "0" else "0"
    labels.to_csv(kaggle_dir / "train_labels.csv", index=False)
    flipped = cache.open_cache(kaggle_dir, cache_root, workers=1, progress=False)
    assert flipped.fingerprint != first.fingerprint
    # what a cache built before this field existed computes from its index: the same
    reloaded = cache.load_cache(flipped.path)
    assert cache.content_fingerprint(reloaded.index) == flipped.fingerprint
