"""The patches a trial trains on: rows of the cache's memory-mapped ``images.npy``
(``PoolImages``, never copied as a whole) with their labels (``TrainData``)."""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the data pipeline is not needed to train on arrays
    from data_pipeline.cache import Cache

PROBE_BYTES = 1 << 20  # PoolImages.signature reads this much from each end of the file


class PoolImages:
    """Rows of a cache's memory-mapped ``images.npy``, never copied as a whole.

    Indexing gathers just the rows asked for ((B, 96, 96, 3) uint8). It pickles as (path,
    rows): every process that receives it (Ray trials, via the object store) maps the same
    file, so the OS page cache holds the patches once per machine, shared by every trial.
    """

    def __init__(self, path: str | Path, rows: np.ndarray) -> None:
        self.path, self.rows = str(path), np.asarray(rows, np.int64)
        self._mm: np.ndarray | None = None

    def __reduce__(self) -> tuple[type, tuple[str, np.ndarray]]:
        return (PoolImages, (self.path, self.rows))

    def _map(self) -> np.ndarray:
        if self._mm is None:
            if not os.path.isfile(self.path):
                raise FileNotFoundError(
                    f"{self.path}: the data cache is not readable on {socket.gethostname()}; "
                    "every Ray node needs it at the same path (a shared --cache-dir)"
                )
            self._mm = np.load(self.path, mmap_mode="r")
        return self._mm

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self._map().shape[1:])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: Any) -> np.ndarray:
        """``pool[idx]`` or ``pool[idx, y0:y1, x0:x1]``: a gather of those rows, in RAM."""
        rest = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        rows = self.rows[key]
        if np.ndim(rows) == 0:
            return self._map()[int(rows)][rest]
        # sorted reads walk the file forwards (page cache / read-ahead); then back in order
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), *self._map().shape[1:]), np.uint8)
        out[order] = self._map()[rows[order]]
        return out[(slice(None), *rest)] if rest else out

    def signature(self) -> str:
        """What says this host's file is the driver's: its size and a hash of its first and
        last ``PROBE_BYTES`` (the .npy header holds the shape). Raises like ``_map`` when the
        file is not there."""
        self._map()
        size = os.path.getsize(self.path)
        h = hashlib.sha1(str(size).encode())
        with open(self.path, "rb") as f:
            h.update(f.read(PROBE_BYTES))
            f.seek(max(0, size - PROBE_BYTES))
            h.update(f.read(PROBE_BYTES))
        return h.hexdigest()

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = self[np.arange(len(self.rows))]
        return out if dtype is None else out.astype(dtype)


@dataclass(frozen=True)
class TrainData:
    """Patches and labels of the labelled pool: images (N, 96, 96, 3) uint8 (an array in RAM,
    or ``PoolImages`` on a cache), labels (N,)."""

    images: np.ndarray | PoolImages
    labels: np.ndarray
    ids: np.ndarray | None = None

    @classmethod
    def from_cache(cls, cache: Cache, rows: np.ndarray | None = None) -> TrainData:
        """Rows of a ``data_pipeline.Cache`` (default: its labelled pool), memory-mapped: no
        copy of the patches is made here (batches gather their rows)."""
        rows = cache.labelled_pool() if rows is None else np.asarray(rows)
        return cls(
            # absolute: Ray workers (other nodes too) run in other folders
            images=PoolImages(Path(cache.path).resolve() / "images.npy", rows),
            labels=cache.index["label"].to_numpy()[rows].astype(np.int64),
            ids=cache.index["id"].to_numpy()[rows],
        )
