"""Turn a Kaggle or PCam folder into a compact, memory-mappable cache, once.

A cache is a folder ``<cache_root>/<name>-<layout>-<fingerprint>/`` holding

    images.npy    (N, 96, 96, 3) uint8, loaded with ``np.load(mmap_mode="r")``
    index.csv     id, label (-1 unknown), split, slide ("" unknown), hash, source
    meta.json     layout, source folder, fingerprint, counts, problems, build settings
    report.csv    every problem found and what was done with it (skipped / kept)
    folds/        fold assignments written later by ``data_pipeline.folds``

It is built in a temp folder and renamed into place, so a cache folder that exists is complete;
an interrupted build leaves nothing that loads. The folder's key covers the source files' names,
sizes and mtimes (stat only: finding the cache of 275k files takes a second), so a changed
source gets a new cache (and the stale one is removed). The *dataset* fingerprint that studies,
refits and saved models record is content-based (``content_fingerprint``: ids, splits, labels,
slides and pixel hashes), so a ``touch`` changes nothing and a flipped label changes it.
Training code reads only the cache.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from data_pipeline import kaggle, pcam_hdf5
from data_pipeline.archive import resolve_source
from data_pipeline.problems import DataError, Problem, counts, summarize, to_csv_text

CACHE_VERSION = 1
CHUNK = 512  # patches per decode task: big enough to amortise IPC, small enough for progress
SHAPE = (96, 96, 3)
# Problems that make a row unusable: skip_bad leaves such rows out of the cache.
ROW_KINDS = {"missing_file", "unreadable", "bad_shape", "bad_label", "duplicate_id"}


def default_cache_root() -> Path:
    """``$PCAM_CACHE_DIR`` if set, else ``~/.cache/pcam-search``."""
    env = os.environ.get("PCAM_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "pcam-search"


CACHE_HINT = "set PCAM_CACHE_DIR (or --cache-dir) to a folder you can write"


def cache_root_dir(cache_root: Path | None = None) -> Path:
    """``cache_root`` (else ``default_cache_root()``), created if it is not there. A file in
    its place, or a folder that cannot be created (a read-only HOME), is a ``DataError`` that
    names it and what to set. An existing read-only folder is fine: a built cache is only
    read."""
    root = Path(cache_root) if cache_root else default_cache_root()
    if root.exists() and not root.is_dir():
        raise DataError(f"the cache folder {root} is a file, not a folder; {CACHE_HINT}")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"cannot create the cache folder {root} ({e.strerror}); {CACHE_HINT}"
        ) from None
    return root


# Besides the pixels: index, report and the folds (a few MB), and room for the rest of the
# disk's users. A memmap written past the disk's end kills the process with SIGBUS (no error
# Python can catch), so the space is checked before the file is made.
FREE_MARGIN_BYTES = 64 << 20


def check_free_space(folder: Path, need: int) -> None:
    """A ``DataError`` naming ``folder`` and the bytes needed when its disk has less free."""
    free = shutil.disk_usage(folder).free
    if free < need + FREE_MARGIN_BYTES:
        raise DataError(
            f"not enough free disk for the cache in {folder}: it needs {_mb(need)} "
            f"(+{_mb(FREE_MARGIN_BYTES)} to spare), {_mb(free)} free; free some space or "
            f"{CACHE_HINT}"
        )


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB"


def available_cpus() -> int:
    """CPUs this process may use (affinity-aware, unlike ``os.cpu_count``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def detect_layout(root: Path) -> str:
    """``"kaggle"`` or ``"pcam"``; a clear error saying what was expected otherwise."""
    root = Path(root)
    if not root.is_dir():
        what = "not a folder or a .zip" if root.exists() else "no such folder"
        raise DataError(f"{root}: {what}")
    if kaggle.is_kaggle(root):
        return "kaggle"
    if pcam_hdf5.is_pcam(root):
        return "pcam"
    raise DataError(
        f"{root}: not a dataset folder I can read. Expected either the Kaggle layout "
        "(train/<id>.tif + train_labels.csv with columns id,label; optional test/ + "
        "sample_submission.csv and patch_id_wsi.csv) or PCam HDF5 files "
        "(camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5 or .h5.gz, in the folder or "
        f"in its pcam/ subfolder). Found: {sorted(p.name for p in root.iterdir())[:10]}"
    )


def fingerprint(root: Path, layout: str, skip_bad: bool = False) -> str:
    """Hash of the source files' relative paths, sizes and mtimes (and the build settings).

    Stat-only, so it costs about a second on Kaggle's 275k files and never reads pixels.
    """
    root = Path(root)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"v{CACHE_VERSION}|{layout}|skip_bad={skip_bad}\n".encode())
    if layout == "kaggle":
        files = [p for p in root.iterdir() if p.is_file() and p.suffix == ".csv"]
        entries = [(p.name, p.stat()) for p in sorted(files)]
        for sub in ("train", "test"):
            if (root / sub).is_dir():
                with os.scandir(root / sub) as it:
                    entries += sorted((f"{sub}/{e.name}", e.stat()) for e in it if e.is_file())
    else:
        entries = [(p.name, p.stat()) for p in pcam_hdf5.source_files(root)]
    for name, st in entries:
        h.update(f"{name}|{st.st_size}|{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def scan(root: Path, workdir: Path) -> tuple[str, pd.DataFrame, list[Problem]]:
    """Layout, entries (id, split, label, slide, path, row) and the problems found pre-decoding."""
    layout = detect_layout(root)
    if layout == "kaggle":
        entries, problems = kaggle.scan(root)
        entries = entries.assign(row=np.int64(-1))
    else:
        entries, problems = pcam_hdf5.scan(root, workdir)
    fatal = [p for p in problems if p.fatal]
    if fatal:
        raise DataError(summarize(fatal, root), problems)
    return layout, entries.reset_index(drop=True), problems


# ---------------------------------------------------------------------------------------------
# Decoding: the only step that touches pixels. Runs in worker processes, each writing its chunk
# straight into the shared output .npy (no pixels go back through pickling).


def _hash(img: np.ndarray) -> str:
    return hashlib.blake2b(img.tobytes(), digest_size=8).hexdigest()


def _decode_task(task: tuple) -> tuple[int, list[str], list[tuple[int, str, str]]]:
    """Decode one chunk. Returns (offset, hashes, [(row, kind, detail)]); writes pixels to out."""
    kind, offset, out, payload = task
    mm = np.load(out, mmap_mode="r+") if out else None
    errors: list[tuple[int, str, str]] = []
    if kind == "h5":
        path, start, stop = payload
        imgs = pcam_hdf5.read_rows(path, start, stop)
        if mm is not None:
            mm[offset : offset + len(imgs)] = imgs
        hashes = [_hash(im) for im in imgs]
    else:
        hashes = []
        for i, path in enumerate(payload):
            if not path:  # missing file: already reported by the scan
                hashes.append("")
                continue
            try:
                img = kaggle.read_tiff(path)
            except ValueError as e:
                errors.append((offset + i, "bad_shape", str(e)))
                hashes.append("")
                continue
            except Exception as e:  # PIL raises OSError, SyntaxError, ... for corrupt files
                errors.append((offset + i, "unreadable", f"{type(e).__name__}: {e}"))
                hashes.append("")
                continue
            if mm is not None:
                mm[offset + i] = img
            hashes.append(_hash(img))
    # no mm.flush(): msync per chunk serialises the workers on the disk; the pages reach the
    # file through the page cache, and the folder is renamed into place only after all workers
    # have exited
    return offset, hashes, errors


def _tasks(entries: pd.DataFrame, out: str) -> Iterator[tuple]:
    """Chunks of consecutive rows; PCam chunks never cross an x file."""
    paths = entries["path"].to_numpy()
    rows = entries["row"].to_numpy()
    n = len(entries)
    start = 0
    while start < n:
        stop = min(start + CHUNK, n)
        if rows[start] >= 0:
            # PCam: extend only while the rows stay in the same file and consecutive
            same = (paths[start:stop] == paths[start]) & (
                rows[start:stop] == rows[start] + np.arange(stop - start)
            )
            stop = start + int(np.argmin(same)) if not same.all() else stop
            yield ("h5", start, out, (paths[start], int(rows[start]), int(rows[stop - 1]) + 1))
        else:
            yield ("tiff", start, out, list(paths[start:stop]))
        start = stop


def _mp_context() -> mp.context.BaseContext:
    """fork: workers start instantly (a spawned worker spends ~1.4 s importing pandas/h5py) and
    need no ``if __name__ == "__main__"`` guard in the caller's script. They only run PIL, numpy
    and h5py on files they open themselves, so threads the parent may hold (torch, Ray) are not
    touched. Where fork does not exist, spawn."""
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def decode(
    entries: pd.DataFrame,
    out: Path | None,
    workers: int,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, list[tuple[int, str, str]]]:
    """Decode every entry (in parallel when ``workers > 1``), optionally into ``out`` (.npy).

    Returns the per-row image hashes ("" where undecodable) and (row, kind, detail) errors.
    """
    hashes = np.full(len(entries), "", dtype=object)
    errors: list[tuple[int, str, str]] = []
    todo = list(_tasks(entries, str(out) if out else ""))

    def take(result: tuple) -> None:
        offset, h, errs = result
        hashes[offset : offset + len(h)] = h
        errors.extend(errs)
        done.add(offset)
        if on_progress:
            on_progress(len(h))

    done: set[int] = set()
    if workers > 1 and len(todo) > 1:
        try:
            ctx = _mp_context()
            with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx) as ex:
                for result in ex.map(_decode_task, todo):
                    take(result)
        except BrokenProcessPool as e:
            # workers could not start (e.g. a __main__ read from stdin): decode the rest here
            print(
                f"warning: parallel decoding failed ({e}); continuing in one process",
                file=sys.stderr,
            )
    for task in todo:
        if task[1] not in done:
            take(_decode_task(task))
    return hashes, errors


def _duplicates(entries: pd.DataFrame, hashes: np.ndarray, ok: np.ndarray) -> list[Problem]:
    """``duplicate_image`` problems for rows sharing pixels; action "kept" when labels agree.

    Exact duplicates with one label are harmless to train on if they stay in one fold (the
    folds force that); copies with different labels cannot both be right, so all are skipped.
    """
    df = pd.DataFrame({"h": hashes, "i": np.arange(len(entries))})[ok & (hashes != "")]
    dup = df[df["h"].duplicated(keep=False)]
    problems = []
    for _, grp in dup.groupby("h", sort=False):
        rows = grp["i"].to_numpy()
        labels = {int(v) for v in entries["label"].to_numpy()[rows] if v >= 0}
        action = "kept" if len(labels) <= 1 else "skipped"
        ids = entries["id"].to_numpy()[rows]
        for r, rid in zip(rows, ids, strict=True):
            others = ", ".join(str(o) for o in ids if o != rid)[:200]
            problems.append(
                Problem(
                    "duplicate_image",
                    id=str(rid),
                    path=_source(entries, r),
                    split=str(entries["split"].iat[r]),
                    action=action,
                    detail=f"same pixels as {others} (labels {sorted(labels) or 'unknown'})",
                )
            )
    return problems


def _source(entries: pd.DataFrame, r: int) -> str:
    row = int(entries["row"].iat[r])
    return entries["path"].iat[r] + (f"#{row}" if row >= 0 else "")


def validate(
    root: Path,
    workdir: Path,
    out: Path | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> tuple[str, pd.DataFrame, np.ndarray, list[Problem]]:
    """Scan and decode ``root``; return (layout, entries, hashes, all problems).

    With ``out`` the decoded pixels are written there (a pre-sized .npy, entries order).
    Fatal problems (unusable CSV or arrays) raise ``DataError`` straight away.
    """
    workers = workers or available_cpus()
    layout, entries, problems = scan(root, workdir)
    if out is not None:
        check_free_space(out.parent, len(entries) * int(np.prod(SHAPE)))
        np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8, shape=(len(entries), *SHAPE))
    with _progress(
        progress, f"decoding {len(entries)} patches ({workers} workers)", len(entries)
    ) as advance:
        hashes, errors = decode(entries, out, workers, advance)
    for r, kind, detail in errors:
        problems.append(
            Problem(
                kind,
                id=str(entries["id"].iat[r]),
                path=_source(entries, r),
                split=str(entries["split"].iat[r]),
                detail=detail,
            )
        )
    bad = _bad_rows(entries, problems)
    problems += _duplicates(entries, hashes, ~bad)
    problems += _one_class(entries, ~bad, root)
    return layout, entries, hashes, problems


def _one_class(entries: pd.DataFrame, ok: np.ndarray, root: Path) -> list[Problem]:
    """A ``one_class`` problem when the usable labelled rows hold a single label."""
    labels = entries["label"].to_numpy()[ok & (entries["split"].to_numpy() != "test")]
    labels = labels[(labels == 0) | (labels == 1)]
    if len(labels) == 0 or len(np.unique(labels)) > 1:
        return []
    detail = f"all {len(labels)} labelled patches have label {int(labels[0])}"
    return [Problem("one_class", path=str(root), detail=detail)]


def _bad_rows(entries: pd.DataFrame, problems: list[Problem]) -> np.ndarray:
    """Mask of rows that a row-level problem makes unusable (by split and id)."""
    bad_keys = {(p.split, p.id) for p in problems if p.kind in ROW_KINDS}
    keys = zip(entries["split"].to_numpy(), entries["id"].to_numpy(), strict=True)
    bad = np.fromiter((k in bad_keys for k in keys), dtype=bool, count=len(entries))
    return bad | (entries["path"].to_numpy() == "")


def check(
    root: Path, cache_root: Path | None = None, workers: int | None = None, progress: bool = True
) -> list[Problem]:
    """Every problem in ``root`` (decoding all images), without building a cache."""
    workdir = cache_root_dir(cache_root) / "unpacked"
    root = resolve_source(Path(root), workdir, progress)
    try:
        return validate(root, workdir, None, workers, progress)[3]
    except DataError as e:
        if e.problems:
            return e.problems
        raise


# ---------------------------------------------------------------------------------------------
# Building and loading


@dataclass(frozen=True)
class Cache:
    """A built cache: ``images`` is a read-only memmap aligned with the rows of ``index``."""

    path: Path
    images: np.ndarray  # (N, 96, 96, 3) uint8
    index: pd.DataFrame  # id, label, split, slide, hash, source
    meta: dict

    @cached_property
    def fingerprint(self) -> str:
        """The data's content fingerprint (``content_fingerprint``), what studies record."""
        return self.meta.get("content_fingerprint") or content_fingerprint(self.index)

    def rows(self, *splits: str) -> np.ndarray:
        """Row numbers of the given splits (all rows when none given)."""
        if not splits:
            return np.arange(len(self.index))
        return np.flatnonzero(self.index["split"].isin(splits).to_numpy())

    def labelled_pool(self) -> np.ndarray:
        """Rows cross-validation trains on: every labelled row except the test split."""
        idx = self.index
        return np.flatnonzero(((idx["split"] != "test") & (idx["label"] >= 0)).to_numpy())


def _cache_name(root: Path, layout: str, fp: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(root).resolve().name)[:40] or "data"
    return f"{name}-{layout}-{fp[:12]}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_abandoned(cache_root: Path) -> None:
    """Remove temp folders of builds whose process is gone (killed mid-build)."""
    for d in cache_root.glob(".building-*"):
        m = re.search(r"-(\d+)$", d.name)
        if m and not pid_alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)


def build_cache(
    root: Path,
    cache_root: Path | None = None,
    skip_bad: bool = False,
    workers: int | None = None,
    progress: bool = True,
    rebuild: bool = False,
) -> Path:
    """Build (or find) the cache of ``root`` and return its folder.

    Raises ``DataError`` naming the count and first offending ids when the source has problems
    and ``skip_bad`` is False; with ``skip_bad`` bad rows are left out and listed in report.csv.
    """
    cache_root = cache_root_dir(cache_root).resolve()
    root = resolve_source(Path(root), cache_root / "unpacked", progress).resolve()
    layout = detect_layout(root)
    fp = fingerprint(root, layout, skip_bad)
    final = cache_root / _cache_name(root, layout, fp)
    if final.is_dir() and not rebuild:
        return final
    cache_root.mkdir(parents=True, exist_ok=True)
    _clean_abandoned(cache_root)
    tmp = cache_root / f".building-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.perf_counter()
    try:
        raw = tmp / "raw.npy"
        layout, entries, hashes, problems = validate(
            root, cache_root / "unpacked", raw, workers, progress
        )
        if problems and not skip_bad:
            raise DataError(
                summarize(problems, root)
                + "\nFix the files, or re-run with --skip-bad to build without the bad rows "
                "(they are listed with reasons in report.csv beside the cache).",
                problems,
            )
        keep = np.flatnonzero(~_rows_left_out(entries, problems))
        problems = [p if p.action != "error" else _with_action(p, "skipped") for p in problems]
        _write_images(raw, tmp / "images.npy", keep, len(entries))
        index = entries.iloc[keep].copy()
        index["hash"] = hashes[keep]
        index["source"] = [_source(entries, int(r)) for r in keep]
        index = index[["id", "label", "split", "slide", "hash", "source"]]
        index.to_csv(tmp / "index.csv", index=False)
        (tmp / "report.csv").write_text(to_csv_text(problems))
        seconds = round(time.perf_counter() - t0, 2)
        meta = _meta(layout, root, fp, index, problems, len(entries), skip_bad, seconds)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        _move_in(tmp, final, rebuild)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove_stale(cache_root, final, root)
    return final


def _rows_left_out(entries: pd.DataFrame, problems: list[Problem]) -> np.ndarray:
    """(N,) bool: rows with a problem, and the duplicates the scan skipped."""
    bad = _bad_rows(entries, problems)
    skipped_dup = {
        (p.split, p.id) for p in problems if p.kind == "duplicate_image" and p.action == "skipped"
    }
    keys = zip(entries["split"].to_numpy(), entries["id"].to_numpy(), strict=True)
    bad |= np.fromiter((k in skipped_dup for k in keys), dtype=bool, count=len(entries))
    return bad


def _write_images(raw: Path, images: Path, keep: np.ndarray, n: int) -> None:
    """``images``: the rows ``keep`` of the decoded ``raw`` array (renamed when it is all)."""
    if len(keep) == n:
        os.replace(raw, images)
        return
    src = np.load(raw, mmap_mode="r")
    check_free_space(images.parent, len(keep) * int(np.prod(SHAPE)))
    dst = np.lib.format.open_memmap(images, mode="w+", dtype=np.uint8, shape=(len(keep), *SHAPE))
    for s in range(0, len(keep), 4096):  # bounded memory: 4096 patches = 113 MB
        dst[s : s + 4096] = src[keep[s : s + 4096]]
    dst.flush()
    del src, dst
    raw.unlink()


def _meta(
    layout: str,
    root: Path,
    fp: str,
    index: pd.DataFrame,
    problems: list[Problem],
    scanned: int,
    skip_bad: bool,
    seconds: float,
) -> dict:
    """The cache's meta.json."""
    return {
        "cache_version": CACHE_VERSION,
        "layout": layout,
        "source": str(root),
        "fingerprint": fp,
        "content_fingerprint": content_fingerprint(index),
        "n": int(len(index)),
        "splits": {k: int(v) for k, v in index["split"].value_counts().items()},
        "labels": {str(k): int(v) for k, v in index["label"].value_counts().items()},
        "slides": int((index["slide"] != "").sum()),
        "problems": counts(problems),
        "skipped": int(scanned - len(index)),
        "skip_bad": skip_bad,
        "build_seconds": seconds,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _move_in(tmp: Path, final: Path, rebuild: bool) -> None:
    """The built folder into place; when a concurrent build won the race, use its cache."""
    if final.exists() and rebuild:
        shutil.rmtree(final)
    try:
        os.replace(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _with_action(p: Problem, action: str) -> Problem:
    return Problem(p.kind, p.id, p.path, p.detail, p.split, action)


def _remove_stale(cache_root: Path, final: Path, root: Path) -> None:
    """Delete older caches of the same source (its fingerprint changed)."""
    skip_bad = json.loads((final / "meta.json").read_text()).get("skip_bad")
    for meta in cache_root.glob("*/meta.json"):
        d = meta.parent
        if d == final:
            continue
        try:
            info = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        if info.get("source") == str(root) and info.get("skip_bad") == skip_bad:
            shutil.rmtree(d, ignore_errors=True)


def content_fingerprint(index: pd.DataFrame) -> str:
    """Hash of what training and scoring see: every row's id, split, label, slide and pixel
    hash, in cache order (16 bytes, hex). Independent of file times and paths."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"content-v1|{len(index)}\n".encode())
    cols = ["id", "split", "label", "slide", "hash"]
    for chunk in range(0, len(index), 65536):
        part = index.iloc[chunk : chunk + 65536][cols].astype(str)
        rows = part["id"]
        for c in cols[1:]:
            rows = rows + "|" + part[c]
        h.update("\n".join(rows).encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def load_cache(path: Path) -> Cache:
    """Open a built cache (images memory-mapped read-only)."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        index = pd.read_csv(
            path / "index.csv",
            dtype={"id": str, "split": str, "slide": str, "hash": str, "source": str},
            keep_default_na=False,
        )
        images = np.load(path / "images.npy", mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a complete cache ({e}); delete it and rebuild") from e
    if meta.get("cache_version") != CACHE_VERSION:
        raise DataError(
            f"{path}: cache version {meta.get('cache_version')} != "
            f"{CACHE_VERSION}; delete it and rebuild"
        )
    if images.shape != (len(index), *SHAPE) or images.dtype != np.uint8:
        raise DataError(
            f"{path}: images.npy is {images.shape} {images.dtype} but index.csv "
            f"has {len(index)} rows; delete the cache and rebuild"
        )
    index["label"] = index["label"].astype(np.int8)
    return Cache(path=path, images=images, index=index, meta=meta)


def open_cache(
    root: Path,
    cache_root: Path | None = None,
    skip_bad: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> Cache:
    """Build the cache of ``root`` if needed, then load it."""
    return load_cache(build_cache(root, cache_root, skip_bad, workers, progress))


class _progress:
    """A rich progress bar (on stderr) as a context manager yielding ``advance(n)``."""

    def __init__(self, enabled: bool, description: str, total: int) -> None:
        self.enabled, self.description, self.total = enabled, description, total

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.bar.start()
        task = self.bar.add_task(self.description, total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.stop()
