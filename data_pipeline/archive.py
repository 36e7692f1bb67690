"""The Kaggle download as it comes: ``histopathologic-cancer-detection.zip``, given wherever a
folder is (``--data``, ``pcam-data check/build``). It is unpacked once into the cache's
``unpacked/`` folder (keyed by the zip's path, size and mtime, like PCam's ``.h5.gz``), with
a progress bar, atomically: an interrupted unpack leaves nothing that is later trusted.
"""

from __future__ import annotations

import hashlib
import shutil
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from data_pipeline.atomic import atomic_path
from data_pipeline.problems import DataError


def is_archive(path: Path) -> bool:
    """Whether ``path`` is a zip file (a Kaggle download) rather than a folder."""
    return Path(path).is_file() and zipfile.is_zipfile(path)


def resolve_source(path: Path, workdir: Path, progress: bool = True) -> Path:
    """``path`` itself for a folder; for a zip, the folder it unpacks to (unpacked once)."""
    return unpack_zip(Path(path), Path(workdir), progress) if is_archive(path) else Path(path)


def _key(path: Path) -> str:
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.blake2b(ident.encode(), digest_size=6).hexdigest()


def _check_members(path: Path, infos: list[zipfile.ZipInfo]) -> None:
    """A member that would land outside the folder (absolute, ``..``) is refused by name."""
    for info in infos:
        name = PurePosixPath(info.filename)
        if name.is_absolute() or ".." in name.parts or "\\" in info.filename:
            raise DataError(f"{path}: member {info.filename!r} points outside the archive")


def unpack_zip(path: Path, workdir: Path, progress: bool = True) -> Path:
    """The folder ``path`` (a zip) unpacks to, in ``workdir``; a corrupt or unsafe member is a
    ``DataError`` naming it."""
    from data_pipeline.cache import _progress, check_free_space  # cache imports this module

    out = workdir / f"{path.stem}.{_key(path)}"
    if not out.is_dir():
        try:
            with zipfile.ZipFile(path) as zf:
                infos = [i for i in zf.infolist() if not i.is_dir()]
                _check_members(path, infos)
                workdir.mkdir(parents=True, exist_ok=True)
                check_free_space(workdir, sum(i.file_size for i in infos))
                with (
                    atomic_path(out) as tmp,
                    _progress(progress, f"unpacking {path.name}", len(infos)) as advance,
                ):
                    tmp.mkdir()
                    for info in infos:
                        _extract(zf, info, tmp, path)
                        advance(1)
        except zipfile.BadZipFile as e:
            raise DataError(f"{path}: not a readable zip archive ({e})") from None
    return _dataset_root(out)


def _extract(zf: zipfile.ZipFile, info: zipfile.ZipInfo, into: Path, path: Path) -> None:
    """One member to ``into``; a failed CRC or a truncated member names the member."""
    dest = into / info.filename
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with zf.open(info) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise  # a full disk or a permission problem: not the archive's fault
        raise DataError(f"{path}: member {info.filename!r} is corrupt ({e})") from None


def _dataset_root(out: Path) -> Path:
    """The unpacked folder, or its one subfolder when the archive wraps everything in one."""
    entries = list(out.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return out
