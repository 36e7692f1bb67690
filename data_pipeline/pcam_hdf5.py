"""Reader for the original PatchCamelyon HDF5 files.

    DIR/camelyonpatch_level_2_split_{train,valid,test}_x.h5   key "x": (N, 96, 96, 3) uint8
    DIR/camelyonpatch_level_2_split_{train,valid,test}_y.h5   key "y": (N, 1, 1, 1) 0/1
    DIR/camelyonpatch_level_2_split_{split}_meta.csv          (optional) has a "wsi" column

The files may sit in DIR or in DIR/pcam/ (torchvision's ``PCAM(root)`` layout), and may be the
``.h5.gz`` files as downloaded: those are unpacked once into a work folder (atomically). Ids are
``<split>_<row>`` with the row zero-padded to 6 digits, e.g. ``valid_000042``.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import zlib
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from data_pipeline.atomic import atomic_path
from data_pipeline.problems import DataError, Problem

SPLITS = ("train", "valid", "test")
PREFIX = "camelyonpatch_level_2_split_"
COLUMNS = ["id", "split", "label", "slide", "path", "row"]


def _folder(root: Path) -> Path | None:
    """The folder holding the PCam files: ``root`` itself or ``root/pcam``."""
    for d in (root, root / "pcam"):
        if d.is_dir() and any(d.glob(f"{PREFIX}*_x.h5*")):
            return d
    return None


def is_pcam(root: Path) -> bool:
    """True when ``root`` (or ``root/pcam``) holds PCam ``*_x.h5`` or ``*_x.h5.gz`` files."""
    return _folder(Path(root)) is not None


def source_files(root: Path) -> list[Path]:
    """Every PCam file of the layout that exists (for fingerprints)."""
    d = _folder(Path(root))
    return sorted(d.glob(f"{PREFIX}*")) if d else []


def _find(d: Path, name: str) -> Path | None:
    """``name`` as .h5, else as .h5.gz; None when neither exists."""
    for p in (d / name, d / f"{name}.gz"):
        if p.is_file():
            return p
    return None


def unpack(path: Path, workdir: Path) -> Path:
    """Return an uncompressed ``.h5`` for ``path``: itself, or a gunzipped copy in ``workdir``.

    The copy is keyed by the archive's name, size and mtime, written to a temp file and renamed,
    so an interrupted unpack never leaves a truncated file that is later trusted.
    """
    if path.suffix != ".gz":
        return path
    st = path.stat()
    key = hashlib.blake2b(
        f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode(), digest_size=6
    ).hexdigest()
    out = Path(workdir) / f"{path.name[:-3]}.{key}"
    if out.is_file():
        return out
    with atomic_path(out) as tmp, gzip.open(path, "rb") as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, length=16 << 20)
    return out


def _unpack_or_report(path: Path, workdir: Path, problems: list[Problem]) -> Path | None:
    """``unpack``, or None with a ``bad_array`` problem naming the archive when it is
    truncated or corrupt (gzip raises EOFError / BadGzipFile / zlib.error mid-stream)."""
    try:
        return unpack(path, workdir)
    except (EOFError, OSError, zlib.error) as e:
        detail = f"cannot decompress (truncated or corrupt gzip): {type(e).__name__}: {e}"
        problems.append(Problem("bad_array", path=str(path), detail=detail))
        return None


def _check_x(path: Path, problems: list[Problem]) -> int | None:
    """Number of patches in an x file, or None (with a ``bad_array`` problem) if unusable."""
    try:
        with h5py.File(path, "r") as f:
            if "x" not in f:
                detail = f"no dataset 'x' (keys: {list(f.keys())})"
            else:
                x = f["x"]
                if x.ndim == 4 and x.shape[1:] == (96, 96, 3) and x.dtype == np.uint8:
                    return int(x.shape[0])
                detail = f"'x' is {x.shape} {x.dtype}, expected (N, 96, 96, 3) uint8"
    except OSError as e:
        detail = f"cannot open as HDF5: {e}"
    problems.append(Problem("bad_array", path=str(path), detail=detail))
    return None


def _read_y(path: Path, n: int, problems: list[Problem]) -> np.ndarray | None:
    """Labels of a y file as int8 (N,), or None (with a ``bad_array`` problem)."""
    try:
        with h5py.File(path, "r") as f:
            if "y" not in f:
                detail = f"no dataset 'y' (keys: {list(f.keys())})"
            else:
                y = np.asarray(f["y"][()])
                if y.shape[0] == n and y.size == n:
                    return y.reshape(n)
                detail = f"'y' is {y.shape}, expected ({n}, 1, 1, 1) to match its x file"
    except OSError as e:
        detail = f"cannot open as HDF5: {e}"
    problems.append(Problem("bad_array", path=str(path), detail=detail))
    return None


def scan(root: Path, workdir: Path) -> tuple[pd.DataFrame, list[Problem]]:
    """List the patches of a PCam folder (all splits present) and the problems found.

    Returns a frame with columns id, split, label (int8, -1 for a bad label), slide ("" when no
    meta CSV), path (uncompressed x file) and row (index in it). Raises ``DataError`` when no
    split is usable.
    """
    d = _folder(Path(root))
    if d is None:
        raise DataError(f"{root}: no {PREFIX}*_x.h5 files")
    problems: list[Problem] = []
    frames = [f for split in SPLITS if (f := _split(d, split, workdir, problems)) is not None]
    if not frames:
        if problems:
            raise DataError(f"{d}: no usable PCam split", problems)
        raise DataError(f"{d}: no complete x/y pair for any of {SPLITS}")
    return pd.concat(frames, ignore_index=True)[COLUMNS], problems


def _split(d: Path, split: str, workdir: Path, problems: list[Problem]) -> pd.DataFrame | None:
    """One split's patches (None when its files are missing or unusable: said in ``problems``)."""
    xp = _find(d, f"{PREFIX}{split}_x.h5")
    yp = _find(d, f"{PREFIX}{split}_y.h5")
    if xp is None and yp is None:
        return None
    if xp is None or yp is None:
        have, lack = (xp, "y") if yp is None else (yp, "x")
        problems.append(
            Problem(
                "missing_source",
                path=str(have),
                split=split,
                detail=f"the matching {split}_{lack}.h5 file is missing",
            )
        )
        return None
    xh, yh = _unpack_or_report(xp, workdir, problems), _unpack_or_report(yp, workdir, problems)
    if xh is None or yh is None:
        return None
    n = _check_x(xh, problems)
    if n is None:
        return None
    y = _read_y(yh, n, problems)
    if y is None:
        return None
    ids = [f"{split}_{i:06d}" for i in range(n)]
    ok = np.isin(y, (0, 1))
    for i in np.flatnonzero(~ok):
        problems.append(
            Problem(
                "bad_label",
                id=ids[i],
                path=str(yp),
                split=split,
                detail=f"label {y[i]!r} is not 0 or 1",
            )
        )
    frame = pd.DataFrame(
        {
            "id": ids,
            "split": split,
            "label": np.where(ok, y, -1).astype(np.int8),
            "slide": "",
            "path": str(xh),
            "row": np.arange(n, dtype=np.int64),
        }
    )
    _add_slides(frame, d / f"{PREFIX}{split}_meta.csv", split, problems)
    return frame


def _add_slides(frame: pd.DataFrame, meta: Path, split: str, problems: list[Problem]) -> None:
    """The slide of each patch from PCam's meta CSV ("wsi"), where there is one that fits."""
    if not meta.is_file():
        return
    m = pd.read_csv(meta, dtype=str, keep_default_na=False)
    if "wsi" not in m.columns or len(m) != len(frame):
        problems.append(
            Problem(
                "bad_columns",
                path=str(meta),
                split=split,
                detail=f"expected a 'wsi' column and {len(frame)} rows; "
                f"found columns {list(m.columns)} and {len(m)} rows",
            )
        )
    else:
        frame["slide"] = m["wsi"].str.strip().to_numpy()


def read_rows(path: str, start: int, stop: int) -> np.ndarray:
    """Patches ``start:stop`` of an x file as a (stop-start, 96, 96, 3) uint8 array."""
    with h5py.File(path, "r") as f:
        return np.asarray(f["x"][start:stop])
