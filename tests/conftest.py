"""Shared fixtures: small datasets written in the real layouts, and an isolated cache root."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from data_pipeline.synth import SynthConfig, write

SMALL = SynthConfig(n=160, n_test=40, seed=3, patches_per_slide=16)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own cache root: nothing touches ~/.cache."""
    root = tmp_path / "cache"
    monkeypatch.setenv("PCAM_CACHE_DIR", str(root))
    return root


@pytest.fixture(scope="session")
def _kaggle_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write(tmp_path_factory.mktemp("master") / "kaggle", SMALL, "kaggle")


@pytest.fixture(scope="session")
def _pcam_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write(tmp_path_factory.mktemp("master") / "pcam", SMALL, "pcam")


@pytest.fixture
def kaggle_dir(_kaggle_master: Path, tmp_path: Path) -> Path:
    """A fresh copy of a small Kaggle-layout dataset (160 train + 40 test), safe to damage."""
    return Path(shutil.copytree(_kaggle_master, tmp_path / "kaggle"))


@pytest.fixture
def pcam_dir(_pcam_master: Path, tmp_path: Path) -> Path:
    """A fresh copy of a small PCam HDF5 dataset, safe to damage."""
    return Path(shutil.copytree(_pcam_master, tmp_path / "pcam"))


@pytest.fixture
def cache_root(_isolated_cache: Path) -> Path:
    return _isolated_cache
