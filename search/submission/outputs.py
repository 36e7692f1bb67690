"""What a refit writes, and how: the submission frame, CSVs written atomically, test
predictions with a progress bar, and the staged output folder swapped in at the end."""

from __future__ import annotations

import os
from pathlib import Path
from typing import overload

import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from data_pipeline.atomic import atomic_path, remove, temp_beside
from data_pipeline.cache import Cache, pid_alive
from data_pipeline.kaggle import SUBMISSION_CSV
from search.common import study as studies
from search.common.ensemble import (
    Ensemble,
    WeightedEnsemble,
)
from search.submission.inputs import RefitError
from search.training.engine import (
    PoolImages,
)

# the files of a refit folder (studies/<study>/refit/<trial-N or ensemble>/)
SUBMISSION = "submission.csv"


OOF_CSV = "oof.csv"


REFIT_JSON = "refit.json"


def submission_frame(cache: Cache, probs: np.ndarray, test_rows: np.ndarray) -> pd.DataFrame:
    """``id,label`` rows in ``sample_submission.csv``'s order (Kaggle layout) or the cache's
    test order (PCam). Ids that differ from the sample submission are a ``RefitError``
    naming them: never a partial or reordered file."""
    ids = cache.index["id"].to_numpy()[test_rows]
    pred = pd.Series(probs, index=ids)
    sample = Path(cache.meta["source"]) / SUBMISSION_CSV
    if cache.meta.get("layout") != "kaggle":
        return pd.DataFrame({"id": ids, "label": probs})
    if not sample.is_file():
        raise RefitError(f"{sample}: missing; it gives the ids and order of a submission")
    want = pd.read_csv(sample, dtype={"id": str})["id"]
    missing = sorted(set(want) - set(ids))
    extra = sorted(set(ids) - set(want))
    if missing or extra:
        raise RefitError(
            f"test images and {sample} disagree: {len(missing)} ids have no image "
            f"(first: {missing[:5]}), {len(extra)} images are not in it (first: {extra[:5]}); "
            "no submission written"
        )
    return pd.DataFrame({"id": want.to_numpy(), "label": pred.loc[want].to_numpy()})


def refuse_earlier(paths: list[Path], force: bool) -> None:
    """Before any work: an earlier refit's file among ``paths`` is replaced only with
    ``force`` (a ``RefitError`` naming it otherwise)."""
    for earlier in paths:
        if earlier.exists() and not force:
            raise RefitError(f"{earlier} exists (an earlier refit); pass --force to replace it")


def check_out_path(path: Path, force: bool) -> None:
    """Before any work: ``path`` can take a CSV (not a folder, not an existing file without
    ``force``, in a folder that can be written); a ``RefitError`` or ``StorageError`` naming
    it otherwise."""
    path = Path(path)
    if path.is_dir():
        raise RefitError(f"--out {path} is a folder; give a file name, e.g. {path / SUBMISSION}")
    if path.exists() and not force:
        raise RefitError(f"{path} exists; pass --force to overwrite it")
    studies.check_writable(path.resolve().parent, "the submission")


def write_csv_atomic(df: pd.DataFrame, path: Path, force: bool) -> Path:
    """Write ``df`` to ``path`` via a temp file + rename; refuse to overwrite without force."""
    path = Path(path)
    if path.exists() and not force:
        raise RefitError(f"{path} exists; pass --force to overwrite it")
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return path


def pool_images(cache: Cache, rows: np.ndarray) -> PoolImages:
    """The cache's patches at ``rows``, memory-mapped (prediction reads them batch by batch)."""
    return PoolImages(Path(cache.path) / "images.npy", rows)


def progress_bar(label: str, enabled: bool) -> Progress:
    """A refit's bar on stderr: label, bar, done/total, elapsed (off with --no-progress)."""
    return Progress(
        TextColumn(label),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        disable=not enabled,
        console=Console(stderr=True),
    )


def predict_test(
    ens: Ensemble | WeightedEnsemble, cache: Cache, tta: int, progress: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(test rows, mean TTA probabilities) for the cache's test split."""
    rows = cache.rows("test")
    if len(rows) == 0:
        return rows, np.zeros(0, np.float32)
    with progress_bar("predict test", progress) as bar:
        task = bar.add_task("test", total=len(rows))
        probs = ens.predict(
            pool_images(cache, rows), tta=tta, progress=lambda n: bar.advance(task, n)
        )
    return rows, probs


def stage_dir(final_dir: Path) -> Path:
    """A new, empty folder beside ``final_dir`` to write a refit's outputs into (stages that
    a killed refit left behind are removed first)."""
    for old in final_dir.parent.glob(f".{final_dir.name}.new*"):
        pid = old.name.rsplit(".new", 1)[-1]
        if not pid.isdigit() or not pid_alive(int(pid)):
            remove(old)
    stage = temp_beside(final_dir, "new")
    remove(stage)
    stage.mkdir(parents=True)
    return stage


def swap_in(stage: Path, final_dir: Path) -> None:
    """Put the whole ``stage`` folder in place of ``final_dir`` (two renames; the old one is
    removed only after)."""
    with atomic_path(final_dir) as tmp:
        os.replace(stage, tmp)


@overload
def moved(path: Path, stage: Path, final_dir: Path) -> Path: ...


@overload
def moved(path: None, stage: Path, final_dir: Path) -> None: ...


def moved(path: Path | None, stage: Path, final_dir: Path) -> Path | None:
    """``path`` as it is after ``swap_in``: inside ``final_dir`` if it was in ``stage``."""
    if path is None or not Path(path).is_relative_to(stage):
        return path
    return final_dir / Path(path).relative_to(stage)
