"""Batches from the patch pool: crop, gather (on the host, a batch ahead; or from a copy of the
pool on the device), uint8 -> float, normalise. ``Batcher`` is what a fold trains on."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from search.training.augment import augment
from search.training.data import PoolImages
from search.training.device import (
    release,
)


def crop_batch(batch: np.ndarray, crop: int) -> torch.Tensor:
    """(B, 96, 96, 3) uint8 -> its centre (B, crop, crop, 3) uint8 tensor, contiguous.

    Kept channels-last (NHWC): ``.permute(0, 3, 1, 2)`` of it is already the channels_last
    memory format convolutions want, so batches need no layout copy.
    """
    o = (batch.shape[1] - crop) // 2
    return torch.from_numpy(np.ascontiguousarray(batch[:, o : o + crop, o : o + crop]))


# Patches per host -> device copy chunk when the pool moves to the device: 4096 96x96 patches
# are 113 MB of pinned host memory at a time
POOL_CHUNK = 4096


POOL_PLACES = ("device", "host")


class Batcher:
    """Turns row indices into (input, target) batches on the device.

    Pool on the device (``place="device"``, when the memory plan says it fits): the cropped
    pool is copied once per trial into one preallocated tensor, labels beside it; an epoch's
    order is drawn on the device and batches are gathered there: no host work per step.
    Pool on the host: each batch gathers its rows from the pool (memory-mapped, shared by
    every trial) and crops them; on CUDA a background thread gathers and pins the next batch
    while the current one trains (``prefetch``), and the copy does not block.
    A device pool that does not fit (out of memory while copying) falls back to the host
    path and says why in ``note``.
    """

    def __init__(
        self,
        images: np.ndarray | PoolImages,
        labels: np.ndarray,
        crop: int,
        device: torch.device,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        place: str = "host",
        prefetch: bool | None = None,
    ) -> None:
        if place not in POOL_PLACES:
            raise ValueError(f"pool place must be one of {POOL_PLACES}, got {place!r}")
        self.images, self.crop, self.device = images, crop, device
        self.labels = np.asarray(labels, np.float32)
        self.cuda = device.type == "cuda"
        self.prefetch = self.cuda if prefetch is None else prefetch
        self.x: torch.Tensor | None = None  # (N, c, c, 3) uint8 on the device, or None
        self.y: torch.Tensor | None = None  # (N,) float32 beside it
        self.note = ""  # why the pool is not where it was planned, if it is not
        if place == "device":
            self._to_device()
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    @property
    def place(self) -> str:
        return "device" if self.x is not None else "host"

    def _to_device(self) -> None:
        n, c = len(self.images), self.crop
        try:
            # one allocation, filled in chunks: no list of chunks + torch.cat (2x the pool)
            x = torch.empty((n, c, c, 3), dtype=torch.uint8, device=self.device)
            for s in range(0, n, POOL_CHUNK):
                chunk = crop_batch(self.images[s : s + POOL_CHUNK], c)
                x[s : s + len(chunk)].copy_(_pinned(chunk, self.cuda), non_blocking=self.cuda)
            self.y = torch.from_numpy(self.labels).to(self.device)
            self.x = x
        except torch.cuda.OutOfMemoryError as e:
            self.x = self.y = x = None
            release(self.device)
            self.note = f"the patch pool did not fit on the device ({first_line(e)}): host path"
            logging.getLogger(__name__).warning(self.note)

    def rows_on_device(self, rows: np.ndarray) -> torch.Tensor | None:
        """A fold's training rows as a device tensor (once per fold) when the pool is there."""
        return None if self.x is None else torch.from_numpy(rows).to(self.device)

    def epoch(
        self, rows: np.ndarray, rows_dev: torch.Tensor | None, steps: int, size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``steps`` batches of ``size`` rows, a random order of ``rows`` (drop-last), as
        (B, c, c, 3) uint8 and (B,) float32 targets on the device. Draws from the default
        generators (the fold's, swapped in by ``_FoldRNG``)."""
        if self.x is not None and self.y is not None and rows_dev is not None:
            perm = rows_dev[torch.randperm(len(rows_dev), device=self.device)]
            for s in range(steps):
                idx = perm[s * size : (s + 1) * size]
                yield self.x[idx], self.y[idx]
            return
        order = rows[torch.randperm(len(rows)).numpy()]  # host order, one draw per epoch
        chunks = [order[s * size : (s + 1) * size] for s in range(steps)]
        for xb, yb in (
            _prefetched(self._gather, chunks) if self.prefetch else map(self._gather, chunks)
        ):
            yield self._put(xb), self._put(yb)

    def _gather(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Host side of a batch: rows gathered from the pool, cropped (pinned on CUDA)."""
        xb = crop_batch(self.images[rows], self.crop)
        return _pinned(xb, self.cuda), _pinned(torch.from_numpy(self.labels[rows]), self.cuda)

    def _put(self, t: torch.Tensor) -> torch.Tensor:
        # from pinned memory a non-blocking copy queues on the stream: the host goes on
        return t.to(self.device, non_blocking=True) if self.cuda else t

    def inputs(self, xb: torch.Tensor, aug: float = 0.0) -> torch.Tensor:
        """(B, c, c, 3) uint8 on the device -> (B, 3, c, c) normalised float, augmented."""
        xb = to_unit(xb)
        if aug > 0:
            xb = augment(xb, aug)
        return normalise(xb, self.mean, self.std)

    def __call__(self, rows: np.ndarray) -> torch.Tensor:
        """Model input for ``rows`` (evaluation: no augmentation)."""
        if self.x is not None:
            return self.inputs(self.x[torch.from_numpy(rows).to(self.device)])
        return self.inputs(self._put(self._gather(rows)[0]))


def _pinned(t: torch.Tensor, cuda: bool) -> torch.Tensor:
    return t.pin_memory() if cuda else t


def _prefetched(fn: Callable[[Any], Any], items: list) -> Iterator[Any]:
    """``fn(item)`` for each item, in order, each computed in a background thread while the
    caller works on the previous result (one ahead)."""
    if not items:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pcam-prefetch") as pool:
        ahead = pool.submit(fn, items[0])
        for nxt in items[1:]:
            done, ahead = ahead.result(), pool.submit(fn, nxt)
            yield done
        yield ahead.result()


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def to_unit(xb: torch.Tensor) -> torch.Tensor:
    """(B, c, c, 3) uint8 -> (B, 3, c, c) float in [0, 1] (a view of the NHWC batch, so it
    stays channels_last in memory)."""
    return xb.permute(0, 3, 1, 2).float().div_(255)


def normalise(xb: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, 3, c, c) floats in [0, 1] -> the model's input: standardised, channels_last (a
    no-op for a permuted NHWC batch). Training, OOF and test predictions all go through it."""
    return ((xb - mean) / std).contiguous(memory_format=torch.channels_last)
