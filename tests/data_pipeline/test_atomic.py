"""One atomic writer for every output: old or whole new, never half, no temp left behind."""

import os
from pathlib import Path

import pandas as pd
import pytest

from data_pipeline.atomic import atomic_path, write_text_atomic
from search.submission.outputs import write_csv_atomic


def test_atomic_path_error_leaves_the_old_file_and_no_temp(tmp_path):
    target = write_text_atomic(tmp_path / "submission.csv", "id,label\nold,0.5\n")
    with pytest.raises(OSError), atomic_path(target) as tmp:
        tmp.write_text("id,label\nhalf")
        raise OSError(28, "No space left on device")
    assert target.read_text() == "id,label\nold,0.5\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["submission.csv"]


def test_atomic_path_replaces_a_folder_only_when_the_new_one_is_whole(tmp_path):
    folder = tmp_path / "ensemble"
    folder.mkdir()
    (folder / "ensemble.json").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_path(folder) as tmp:
        tmp.mkdir()
        (tmp / "fold0.safetensors").write_bytes(b"x")
        raise KeyboardInterrupt
    assert [p.name for p in folder.iterdir()] == ["ensemble.json"]
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        (tmp / "ensemble.json").write_text("new")
    assert (folder / "ensemble.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ensemble"]


def test_write_csv_atomic_failure_leaves_no_temp_file(tmp_path, monkeypatch):
    def full_disk(self, path, *a, **k):
        Path(path).write_text("id,la")  # part written, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", full_disk)
    with pytest.raises(OSError):
        write_csv_atomic(pd.DataFrame({"id": ["a"], "label": [0.5]}), tmp_path / "s.csv", False)
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_never_opens_the_files_beside_its_target(tmp_path, monkeypatch):
    # another writer's file in the same folder (a trial's checkpoint beside another's) may be
    # removed between a listing and an open: writing ours must not depend on it
    other = tmp_path / "other.pt"
    other.write_bytes(b"x")
    real_open = os.open

    def open_(path, *a, **k):
        if Path(path) == other:  # removed by its own writer just now
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", open_)
    write_text_atomic(tmp_path / "mine.pt", "state")
    assert (tmp_path / "mine.pt").read_text() == "state"
