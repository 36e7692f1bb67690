import gzip
import shutil

import h5py
import numpy as np
import pytest
from torchvision.datasets import PCAM

from data_pipeline import cache, pcam_hdf5
from data_pipeline.problems import DataError


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_scan_matches_torchvision_pcam(pcam_dir, tmp_path, split):
    # torchvision reads <root>/pcam/*.h5; our reader must agree image-for-image, label-for-label
    root = tmp_path / "tv"
    shutil.copytree(pcam_dir, root / "pcam")
    tv = PCAM(str(root), split={"valid": "val"}.get(split, split), download=False)
    c = cache.open_cache(root, tmp_path / "cache", workers=1, progress=False)
    rows = c.rows(split)
    assert len(rows) == len(tv) > 0
    for i, r in enumerate(rows):
        img, label = tv[i]
        assert np.array_equal(np.asarray(img), c.images[r])
        assert int(label) == int(c.index.label.iloc[r])
    assert c.index.id.iloc[rows[0]] == f"{split}_000000"


def test_scan_reads_gzipped_files_as_downloaded(pcam_dir, tmp_path):
    for p in list(pcam_dir.glob("*.h5")):
        with open(p, "rb") as src, gzip.open(f"{p}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        p.unlink()
    plain = cache.open_cache(pcam_dir, tmp_path / "c1", workers=1, progress=False)
    assert plain.meta["layout"] == "pcam" and plain.meta["n"] == 200
    assert (plain.index.slide != "").all()  # meta CSV's wsi column


def test_scan_bad_array_shape_is_fatal_and_named(pcam_dir, tmp_path):
    bad = pcam_dir / "camelyonpatch_level_2_split_valid_x.h5"
    bad.unlink()
    with h5py.File(bad, "w") as f:
        f.create_dataset("x", data=np.zeros((4, 64, 64, 3), np.uint8))
    with pytest.raises(DataError, match="valid_x.h5"):
        cache.build_cache(pcam_dir, tmp_path / "c", workers=1, progress=False)


def test_scan_labels_not_binary_are_reported(pcam_dir, tmp_path):
    yp = pcam_dir / "camelyonpatch_level_2_split_test_y.h5"
    with h5py.File(yp, "r+") as f:
        y = f["y"][()]
        y[2] = 7
        f["y"][...] = y
    _, problems = pcam_hdf5.scan(pcam_dir, tmp_path / "w")
    assert [(p.kind, p.id) for p in problems] == [("bad_label", "test_000002")]


def test_scan_missing_y_file_is_reported(pcam_dir, tmp_path):
    (pcam_dir / "camelyonpatch_level_2_split_valid_y.h5").unlink()
    with pytest.raises(DataError, match="valid_y.h5 file is missing"):
        cache.build_cache(pcam_dir, tmp_path / "c", workers=1, progress=False)


@pytest.mark.parametrize("skip_bad", [False, True])
def test_scan_truncated_gzip_is_named_and_fatal(pcam_dir, tmp_path, skip_bad):
    # a download cut short: the archive ends mid-stream; the error names it, no traceback
    src = pcam_dir / "camelyonpatch_level_2_split_valid_x.h5"
    with open(src, "rb") as f, gzip.open(f"{src}.gz", "wb") as dst:
        shutil.copyfileobj(f, dst)
    src.unlink()
    gz = pcam_dir / "camelyonpatch_level_2_split_valid_x.h5.gz"
    gz.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])
    with pytest.raises(DataError) as e:
        cache.build_cache(pcam_dir, tmp_path / "c", workers=1, progress=False, skip_bad=skip_bad)
    assert "valid_x.h5.gz" in str(e.value) and "truncated or corrupt gzip" in str(e.value)
    assert not list(tmp_path.glob("c/**/*.tmp*"))
