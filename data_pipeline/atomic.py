"""Write a file or a folder so that readers see the old one or the whole new one, never half.

Every output of the project (caches, folds, submissions, ensembles, reports) goes through
``atomic_path``: the content is written to a temp path beside the target (same file system,
so the rename is atomic), flushed to disk, then renamed over the target; if writing fails
(a full disk, Ctrl-C, a bad value) the temp file or folder is removed and the target is left
as it was.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_beside(path: Path, tag: str = "tmp") -> Path:
    """A hidden name beside ``path`` that no other process uses: ``.<name>.<tag><pid>``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}{os.getpid()}")


def remove(path: Path) -> None:
    """Remove a file or a folder, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_one(path: Path) -> None:
    """Flush one file, or one folder's entries (not the files in it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder: the rename still is atomic
        pass
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    """Flush ``path`` (a file, or every file of a folder, and the folder) to disk."""
    paths = [*sorted(p for p in path.rglob("*") if p.is_file()), path] if path.is_dir() else [path]
    for p in paths:
        _fsync_one(p)


@contextmanager
def atomic_path(path: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path to write ``path``'s new content to (a file, or a folder the caller
    makes); on success it is flushed and renamed over ``path``, replacing an old file, or an
    old folder only once the new one is whole. On any error the temp path is removed and
    ``path`` is unchanged. ``suffix``: appended to the temp name (``np.save`` wants ".npy")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path).with_name(temp_beside(path).name + suffix)
    remove(tmp)
    try:
        yield tmp
        fsync_path(tmp)
        if tmp.is_dir() and path.is_dir():
            old = temp_beside(path, "old")
            os.replace(path, old)
            os.replace(tmp, path)
            remove(old)
        else:
            os.replace(tmp, path)
        # the parent's entries only: its other files belong to other writers, who may
        # remove them at any moment (a trial's checkpoint beside another's)
        _fsync_one(path.parent)
    except BaseException:
        remove(tmp)
        raise


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see ``atomic_path``)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see ``atomic_path``)."""
    return write_bytes_atomic(path, text.encode("utf-8"))
