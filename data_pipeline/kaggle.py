"""Reader for the Kaggle "Histopathologic Cancer Detection" folder layout.

    DIR/train/<id>.tif          96x96 RGB patches
    DIR/train_labels.csv        id,label
    DIR/test/<id>.tif           (optional) unlabelled patches to submit
    DIR/sample_submission.csv   (optional with test/) id,label: the ids and order of a submission
    DIR/patch_id_wsi.csv        (optional) id,wsi: slide of each train id; may cover only some ids
    DIR/test_labels.csv         (optional, not on Kaggle) id,label for test/; the embedded
                                dataset writes it so refit can report an honest test AUC

``scan`` lists what is there and what is wrong with the CSVs and file lists; decoding the
images (unreadable, wrong size) happens in the cache builder, in parallel, via ``read_tiff``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from data_pipeline.problems import DataError, Problem

PATCH = 96
LABELS_CSV = "train_labels.csv"
SUBMISSION_CSV = "sample_submission.csv"
SLIDES_CSV = "patch_id_wsi.csv"
TEST_LABELS_CSV = "test_labels.csv"
COLUMNS = ["id", "split", "label", "slide", "path"]


def is_kaggle(root: Path) -> bool:
    """True when ``root`` looks like the Kaggle layout (train/ folder and train_labels.csv)."""
    return (root / "train").is_dir() and (root / LABELS_CSV).is_file()


def read_tiff(path: str | os.PathLike) -> np.ndarray:
    """Decode one patch to a (96, 96, 3) uint8 array.

    Raises ``OSError`` for a file that cannot be decoded and ``ValueError`` naming the size/mode
    for one that is not 96x96 RGB (no silent conversion: a grey or RGBA patch is a data error).
    """
    with Image.open(path) as im:
        im.load()  # decode now: a truncated file raises here, not later in training
        if im.mode != "RGB" or im.size != (PATCH, PATCH):
            raise ValueError(f"expected 96x96 RGB, got {im.size[0]}x{im.size[1]} {im.mode}")
        return np.asarray(im, dtype=np.uint8)


def _list_tifs(folder: Path, split: str, problems: list[Problem]) -> dict[str, str]:
    """id -> path of every ``*.tif`` directly in ``folder`` (scandir: fast on 220k files).
    A name that is not valid UTF-8 (Python hands it over with surrogate escapes, which no CSV
    or index can hold) is a ``bad_name`` problem shown with its bytes escaped, not an id."""
    if not folder.is_dir():
        return {}
    files = {}
    with os.scandir(folder) as it:
        for e in it:
            if not (e.name.endswith(".tif") and e.is_file()):
                continue
            try:
                e.name.encode("utf-8")
            except UnicodeEncodeError:
                shown = os.fsencode(e.path).decode("utf-8", "backslashreplace")
                problems.append(
                    Problem("bad_name", path=shown, split=split, detail="not valid UTF-8")
                )
                continue
            files[e.name[:-4]] = e.path
    return files


def _read_csv(path: Path, required: list[str], problems: list[Problem]) -> pd.DataFrame | None:
    """Read a CSV as strings; a missing column or parse failure is a fatal ``bad_columns``."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:  # pandas raises several types for malformed CSVs
        problems.append(Problem("bad_columns", path=str(path), detail=f"cannot parse: {e}"))
        return None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        problems.append(
            Problem(
                "bad_columns",
                path=str(path),
                detail=f"missing column(s) {missing}; found {list(df.columns)}; "
                f"expected header {','.join(required)}",
            )
        )
        return None
    df["id"] = df["id"].str.strip()
    return df


def _parse_labels(df: pd.DataFrame, path: Path, split: str, problems: list[Problem]) -> pd.Series:
    """Labels as int8 with -1 where the value is not 0/1 (each such row is a ``bad_label``)."""
    raw = df["label"].str.strip()
    num = pd.to_numeric(raw, errors="coerce")
    ok = num.isin([0, 1])
    for i in np.flatnonzero(~ok.to_numpy()):
        problems.append(
            Problem(
                "bad_label",
                id=df["id"].iat[i],
                path=str(path),
                split=split,
                detail=f"label {raw.iat[i]!r} is not 0 or 1",
            )
        )
    return num.where(ok, -1).fillna(-1).astype(np.int8)


def _duplicate_ids(df: pd.DataFrame, path: Path, split: str, problems: list[Problem]) -> pd.Series:
    """Mask of rows whose id occurs more than once; every such row is a ``duplicate_id``."""
    dup = df["id"].duplicated(keep=False)
    for i in np.flatnonzero(dup.to_numpy()):
        problems.append(
            Problem(
                "duplicate_id",
                id=df["id"].iat[i],
                path=str(path),
                split=split,
                detail=f"row {i + 2} of {path.name}",
            )
        )
    return dup


def _match_files(
    ids: pd.Series,
    files: dict[str, str],
    folder: Path,
    csv: Path,
    split: str,
    problems: list[Problem],
) -> pd.Series:
    """Paths for ``ids`` ("" where missing); report ids without files and files without ids."""
    paths = ids.map(files).fillna("")
    for i in np.flatnonzero((paths == "").to_numpy()):
        problems.append(
            Problem(
                "missing_file",
                id=ids.iat[i],
                path=str(folder / f"{ids.iat[i]}.tif"),
                split=split,
                detail=f"listed in {csv.name} but no file",
            )
        )
    listed = set(ids)
    for fid in sorted(set(files) - listed):
        problems.append(
            Problem(
                "unlabelled_file",
                id=fid,
                path=files[fid],
                split=split,
                detail=f"no row in {csv.name}",
            )
        )
    return paths


def scan(root: Path) -> tuple[pd.DataFrame, list[Problem]]:
    """List the patches of a Kaggle folder and the problems visible without decoding.

    Returns a frame with columns id, split ("train"/"test"), label (int8: 0/1, -1 unknown or
    bad), slide ("" when not known), path ("" when the file is missing), in CSV order, and the
    list of problems. Raises ``DataError`` when ``train_labels.csv`` cannot be used at all.
    """
    root = Path(root)
    problems: list[Problem] = []
    frames = []

    labels_csv = root / LABELS_CSV
    train = _read_csv(labels_csv, ["id", "label"], problems)
    if train is None:
        raise DataError(f"{labels_csv}: {problems[-1].detail}", problems)
    train = train[["id", "label"]].copy()
    train["label"] = _parse_labels(train, labels_csv, "train", problems)
    _duplicate_ids(train, labels_csv, "train", problems)
    files = _list_tifs(root / "train", "train", problems)
    train["path"] = _match_files(train["id"], files, root / "train", labels_csv, "train", problems)
    train["split"] = "train"
    frames.append(train)

    test_dir, sub_csv = root / "test", root / SUBMISSION_CSV
    if sub_csv.is_file():
        test = _read_csv(sub_csv, ["id", "label"], problems)
        if test is not None:
            test = test[["id"]].copy()
            _duplicate_ids(test, sub_csv, "test", problems)
            files = _list_tifs(test_dir, "test", problems)
            test["path"] = _match_files(test["id"], files, test_dir, sub_csv, "test", problems)
            test["label"] = np.int8(-1)
            truth_csv = root / TEST_LABELS_CSV
            if truth_csv.is_file():
                truth = _read_csv(truth_csv, ["id", "label"], problems)
                if truth is not None:
                    truth["label"] = _parse_labels(truth, truth_csv, "test", problems)
                    lab = truth.drop_duplicates("id").set_index("id")["label"]
                    test["label"] = test["id"].map(lab).fillna(-1).astype(np.int8)
            test["split"] = "test"
            frames.append(test)
    elif test_dir.is_dir():
        problems.append(
            Problem(
                "missing_source",
                path=str(sub_csv),
                detail="test/ exists but sample_submission.csv (id,label) is missing",
            )
        )

    df = pd.concat(frames, ignore_index=True)
    df["slide"] = ""
    slides_csv = root / SLIDES_CSV
    if slides_csv.is_file():
        wsi = _read_csv(slides_csv, ["id", "wsi"], problems)
        if wsi is not None:
            # The community slide map covers only part of the ids; unmapped ids keep "" and
            # become their own fold groups. Ids mapped twice keep their first slide.
            slide_of = wsi.drop_duplicates("id").set_index("id")["wsi"].str.strip()
            df["slide"] = df["id"].map(slide_of).fillna("")
    df["label"] = df["label"].astype(np.int8)
    return df[COLUMNS], problems
