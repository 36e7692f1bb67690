"""The cross-validation training engine: the only code in the project that trains a model.

``train_cv(params, data, folds, epochs=...)`` trains one model per fold. Each fold is a
``_Fold`` (model, optimizer, schedule, RNG, rows, latest metrics, best-so-far) with
``train_epoch()`` and ``score()``; ``train_cv`` only decides the order and reports. Lockstep
(refit, default): after epoch e every fold has trained e epochs and been scored on its held-out
part. Fold racing (the search): fold 0 trains epoch 1 alone, the other folds catch up one at a
time, then lockstep; each report says how many folds it averages and the fold-epochs spent, so
a scheduler can drop a poor trial after one fold-epoch. Read ``train_cv`` top to bottom: set
up data and folds, then loop epochs -> fold groups -> report.

Data: the cache's uint8 patches stay in its memory-mapped file (``PoolImages``): the OS page
cache holds them once per machine for every trial; each batch gathers its random rows and
crops them (on a GPU with room, the cropped pool is copied to the device once per trial);
batches are augmented as whole tensors (``search.augment``).
CUDA: AMP (bf16 where supported), channels_last, non-blocking copies. CPU: channels_last too
(measured faster with oneDNN), ``threads`` threads, bf16 autocast on CPUs with AMX units
(``cpu_bf16``; ``PCAM_AMP=off`` for fp32).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from timm.utils import ModelEmaV3

import models
from search.augment import augment, cutmix, mixup
from search.losses import LOSSES, binary_loss

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = ("cosine", "onecycle", "constant")
ONECYCLE_PCT = 0.25  # onecycle: share of all steps spent rising from lr/25 to lr
MIXES = ("none", "mixup", "cutmix")
MIN_DELTA = 1e-4  # an AUC gain smaller than this is not an improvement (early stopping)
CROPS = (32, 48, 64, 96)


@dataclass(frozen=True)
class TrainParams:
    """Everything a search can tune. ``from_dict`` builds it from a trial's params."""

    arch: str = "simple_cnn"  # simple_cnn, resnet18/34/50 or any timm name
    lr: float = 1e-3  # peak learning rate (after warm-up)
    optimizer: str = "adamw"  # adam | adamw | sgd (momentum, nesterov) | rmsprop
    batch_size: int = 64
    dropout: float = 0.3  # before the 1-logit head
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0  # linear warm-up (cosine / constant schedules)
    schedule: str = "cosine"  # cosine: warm-up then cosine to 0 | onecycle | constant
    label_smoothing: float = 0.0  # targets become y*(1-s) + s/2
    crop: int = 64  # centre crop in px (label lives in the centre 32x32): 32, 48, 64 or 96
    aug: float = 0.5  # augmentation strength 0..1 (0 = none; >0 = dihedral + HED jitter)
    unfreeze: int = 4  # ResNets: stages trained from the head (0 = head only, 4 = all)
    momentum: float = 0.9  # sgd / rmsprop
    width: int = 16  # simple_cnn: channels of the first block
    depth: int = 4  # simple_cnn: number of blocks
    patience: int = 0  # early stopping: epochs without a better held-out AUC (0 = off)
    restore_best: bool = False  # keep each fold's best-epoch weights (and OOF probs)
    mix: str = "none"  # none | mixup | cutmix (cutmix labels follow the centre 32x32)
    mix_alpha: float = 0.4  # Beta(alpha, alpha) of the mixing weight / box size
    mix_prob: float = 0.5  # share of batches mixed
    loss: str = "bce"  # bce | focal
    focal_gamma: float = 2.0  # focal: (1 - p_t)^gamma; 0 = BCE
    focal_alpha: float = -1.0  # focal: weight of positives in [0, 1]; < 0 = none
    pos_weight: float = 1.0  # BCE/focal weight of positive examples (PCam is ~60/40)
    ema: float = 0.0  # decay of an EMA of the weights (timm ModelEmaV3, warm-up); 0 = off.
    # With it on, the EMA weights are the ones scored, kept and submitted

    @classmethod
    def from_dict(cls, params: dict) -> TrainParams:
        """Build from a dict; unknown keys or invalid values are a clear error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown training params {unknown}; known: {sorted(known)}")
        p = cls(**params)
        if p.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {p.optimizer!r}")
        if p.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {p.crop}")
        if p.lr <= 0 or p.batch_size < 2 or not 0 <= p.dropout < 1 or not 0 <= p.aug <= 1:
            raise ValueError(f"invalid params {params}")
        if p.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {p.schedule!r}")
        if p.mix not in MIXES:
            raise ValueError(f"mix must be one of {MIXES}, got {p.mix!r}")
        if p.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {p.loss!r}")
        if p.patience < 0 or p.mix_alpha < 0 or not 0 <= p.mix_prob <= 1 or p.pos_weight <= 0:
            raise ValueError(f"invalid params {params}")
        if not 0 <= p.ema < 1:
            raise ValueError(f"ema must be a decay in [0, 1), got {p.ema}")
        return p


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

    def __reduce__(self):
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

    def __getitem__(self, key) -> np.ndarray:
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

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
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
    def from_cache(cls, cache, rows: np.ndarray | None = None) -> TrainData:
        """Rows of a ``data_pipeline.Cache`` (default: its labelled pool), memory-mapped: no
        copy of the patches is made here (batches gather their rows)."""
        rows = cache.labelled_pool() if rows is None else np.asarray(rows)
        return cls(
            # absolute: Ray workers (other nodes too) run in other folders
            images=PoolImages(Path(cache.path).resolve() / "images.npy", rows),
            labels=cache.index["label"].to_numpy()[rows].astype(np.int64),
            ids=cache.index["id"].to_numpy()[rows],
        )


class TrialError(RuntimeError):
    """A trial failed for a reason the search records (error type + message in user attrs)."""

    def __init__(self, message: str, epoch: int, params: dict) -> None:
        super().__init__(f"{message} at epoch {epoch} with params {params}")
        self.message, self.epoch, self.params = message, epoch, params

    def __reduce__(self):
        # Ray copies and pickles errors from trials to the driver: rebuild from the same args
        return (type(self), (self.message, self.epoch, self.params))


class TrialDiverged(TrialError):
    """The training loss or the predictions became NaN/inf."""


class TrialOutOfMemory(TrialError):
    """CUDA ran out of memory (batch size or model too large for the device share)."""


@dataclass
class CVResult:
    """Per-epoch metrics of the lockstep run and, on request, fold weights and OOF probs."""

    history: list[dict]  # one dict per report (per epoch; racing: per fold at epoch 1)
    stopped_early: bool  # on_epoch asked to stop before ``epochs``
    seconds: float
    device: str
    states: list[dict] | None = None  # per-fold state_dicts (CPU tensors; best epoch's with
    # restore_best)
    oof: np.ndarray | None = None  # (N,) held-out probability of each row, its fold's last epoch
    oof_best: np.ndarray | None = None  # (N,) same at its fold's best epoch (restore_best)
    best_epochs: list[int] | None = None  # per fold: epoch of the best held-out AUC
    self_stopped: bool = False  # early stopping (patience) ended every fold before ``epochs``

    @property
    def epochs_run(self) -> int:
        return self.history[-1]["epoch"] if self.history else 0

    @property
    def final(self) -> dict:
        return self.history[-1]


def create_model(p: TrainParams, pretrained: bool | str = False) -> torch.nn.Module:
    """The model ``p`` describes (``models.create`` with its arch, dropout, stages, size)."""
    return models.create(
        p.arch,
        dropout=p.dropout,
        unfreeze=p.unfreeze,
        pretrained=pretrained,
        width=p.width,
        depth=p.depth,
    )


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _make_optimizer(p: TrainParams, params) -> torch.optim.Optimizer:
    if p.optimizer == "adam":
        return torch.optim.Adam(params, lr=p.lr, weight_decay=p.weight_decay)
    if p.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=p.lr, weight_decay=p.weight_decay)
    if p.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=p.lr, momentum=p.momentum, nesterov=True, weight_decay=p.weight_decay
        )
    return torch.optim.RMSprop(params, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str = "cosine") -> float:
    """The lr multiplier at ``step`` (0-based) of ``total_steps``.

    cosine: linear warm-up to 1 over ``warmup_steps``, then cosine decay to 0 at the end.
    constant: the same warm-up, then 1. onecycle (Smith's 1cycle, as torch's OneCycleLR with
    cosine annealing): from 1/25 up to 1 over the first ``ONECYCLE_PCT`` of the steps, then
    down to ~0; it has its own warm-up and ignores ``warmup_steps``.
    """
    if schedule == "onecycle":
        up = max(1, round(ONECYCLE_PCT * total_steps))
        if step < up:
            return 1 / 25 + (1 - 1 / 25) * 0.5 * (1 - math.cos(math.pi * step / up))
        progress = min(1.0, (step - up) / max(1, total_steps - up))
        return 0.5 * (1 + math.cos(math.pi * progress))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def centre_crop(images: np.ndarray, crop: int) -> torch.Tensor:
    """(N, 96, 96, 3) uint8 -> (N, crop, crop, 3) uint8 tensor, contiguous, in RAM.

    Kept channels-last (NHWC): ``.permute(0, 3, 1, 2)`` of it is already the channels_last
    memory format convolutions want, so batches need no layout copy.
    """
    o = (images.shape[1] - crop) // 2
    return torch.from_numpy(np.ascontiguousarray(images[:, o : o + crop, o : o + crop]))


def crop_batch(batch: np.ndarray, crop: int) -> torch.Tensor:
    """(B, 96, 96, 3) uint8 -> its centre (B, crop, crop, 3), contiguous (channels-last)."""
    o = (batch.shape[1] - crop) // 2
    return torch.from_numpy(np.ascontiguousarray(batch[:, o : o + crop, o : o + crop]))


# On a GPU the cropped pool moves to the device once per trial when it takes less than this
# share of the free memory; otherwise (and on CPU) each batch gathers its rows from the pool
GPU_POOL_SHARE = 0.25


class _Batcher:
    """Turns index batches into normalised float input on the device: each batch gathers its
    rows from the pool (memory-mapped, shared by every trial) and crops them; on a GPU with
    room the cropped pool is copied to the device once instead."""

    def __init__(self, images, crop: int, device: torch.device, mean, std) -> None:
        self.images, self.crop, self.device = images, crop, device
        self.cuda = device.type == "cuda"
        self.x: torch.Tensor | None = None
        if self.cuda and len(images) * crop * crop * 3 < GPU_POOL_SHARE * _free_gpu(device):
            chunks = range(0, len(images), 4096)  # bounded host memory: 4096 patches, 113 MB
            self.x = torch.cat([crop_batch(images[s : s + 4096], crop).to(device) for s in chunks])
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    def __call__(
        self, idx: torch.Tensor, aug: float = 0.0, gen: torch.Generator | None = None
    ) -> torch.Tensor:
        if self.x is not None:
            xb = self.x[idx.to(self.x.device)]  # (B, c, c, 3) uint8, on the device
        else:
            xb = crop_batch(self.images[idx.numpy()], self.crop)  # gather, then crop
            if self.cuda:
                xb = xb.pin_memory().to(self.device, non_blocking=True)
        xb = xb.permute(0, 3, 1, 2).float().div_(255)  # (B, 3, c, c) in [0, 1]
        if aug > 0:
            xb = augment(xb, aug, gen)
        return normalise(xb, self.mean, self.std)


def normalise(xb: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, 3, c, c) floats in [0, 1] -> the model's input: standardised, channels_last (a
    no-op for a permuted NHWC batch). Training, OOF and test predictions all go through it."""
    return ((xb - mean) / std).contiguous(memory_format=torch.channels_last)


def probabilities(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B,) float32 sigmoid probabilities of a binary ``model`` on input ``x``, under the
    device's autocast rule (``_amp_dtype``: bf16 where the device has fast bf16, fp16 on
    older GPUs, else fp32).
    The one inference step: OOF scoring in training and the saved ensemble's test
    predictions share it, so both see the same numerics."""
    amp = _amp_dtype(x.device)
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        logits = model(x).squeeze(1)
    return torch.sigmoid(logits.float())


def _free_gpu(device: torch.device) -> int:
    return torch.cuda.mem_get_info(device)[0]


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")


# PCAM_AMP=off trains and predicts in fp32 everywhere (the numbers of a run before CPU bf16)
AMP_ENV = "PCAM_AMP"


def cpu_bf16() -> bool:
    """Whether this CPU has bf16 matrix units (Intel AMX, Sapphire Rapids and later), where
    oneDNN runs bf16 convolutions 1.6-2x faster than fp32 (benchmarks/train_throughput.py);
    without them bf16 is emulated and slower, so those CPUs stay in fp32."""
    is_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private: may move
    return bool(is_amx and is_amx())


@functools.cache  # asked per inference batch (probabilities): the answer is per device
def _amp_dtype(dev: torch.device) -> torch.dtype | None:
    """Autocast dtype: CUDA bf16 where supported, else fp16; CPU bf16 on AMX CPUs, else None
    (fp32). ``PCAM_AMP=off`` (read once per process): None everywhere."""
    if os.environ.get(AMP_ENV, "auto").lower() in ("off", "0", "fp32", "no"):
        return None
    if dev.type == "cpu":
        return torch.bfloat16 if cpu_bf16() else None
    if dev.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def precision(dev: str | torch.device) -> str:
    """The arithmetic training and inference use on ``dev``: "bf16", "fp16" or "fp32"."""
    amp = _amp_dtype(torch.device(dev))
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp, "fp32")


class _Run:
    """What every fold of one ``train_cv`` call shares: params, device, batches, labels."""

    def __init__(self, p: TrainParams, dev: torch.device, batch: _Batcher, labels: np.ndarray):
        self.p, self.dev, self.batch, self.labels = p, dev, batch, labels
        self.cuda = dev.type == "cuda"
        self.amp = _amp_dtype(dev)
        self.y = torch.as_tensor(labels, dtype=torch.float32)
        self.oof = np.full(len(labels), np.nan, dtype=np.float32)  # last scored epoch
        self.oof_best = np.full(len(labels), np.nan, dtype=np.float32)  # best epoch per fold


class _Fold:
    """One fold: its model, optimizer, schedule, RNG, rows, latest metrics and best-so-far.

    Fold ``f`` trains on the rows of the other folds and is scored on its own.
    """

    def __init__(
        self, f: int, p: TrainParams, folds: np.ndarray, epochs: int, seed: int, dev, pretrained
    ) -> None:
        torch.manual_seed(seed * 1000 + f)  # same seed -> same init per fold
        self.f = f
        self.model = create_model(p, pretrained).to(dev, memory_format=torch.channels_last)
        self.train_idx = torch.from_numpy(np.flatnonzero(folds != f))
        self.val_idx = np.flatnonzero(folds == f)
        self.steps = max(1, len(self.train_idx) // p.batch_size)  # drop_last: BN on 1-2 samples
        self.opt = _make_optimizer(p, [q for q in self.model.parameters() if q.requires_grad])
        # timm's warm-up ramps the decay up from 0 (1 - (1 + step)^(-2/3), at most p.ema), so
        # a short run's EMA is not dominated by the random init
        self.ema = ModelEmaV3(self.model, decay=p.ema, use_warmup=True) if p.ema else None
        warm = round(p.warmup_epochs * self.steps)
        self.epochs = epochs  # the schedule's length; train_full may shorten it (a deadline)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, warm, self.epochs * self.steps, p.schedule)
        )
        # float16 autocast needs loss scaling; bf16 and fp32 do not
        self.scaler = torch.amp.GradScaler("cuda", enabled=_amp_dtype(dev) == torch.float16)
        self.gen = torch.Generator().manual_seed(seed * 1000 + f)
        self.epoch = 0  # epochs trained
        self.active = True  # False once early stopping (patience) ended this fold
        self.auc = self.loss = self.acc = self.train_loss = math.nan  # latest epoch
        self.best_auc, self.best_epoch, self.since = -math.inf, 0, 0
        self.best_state: dict | None = None  # CPU copy of the best epoch's weights

    def train_epoch(self, run: _Run) -> int:
        """One pass over this fold's training rows; returns the images seen."""
        p, m, g = run.p, self.model, self.gen
        m.train()
        perm = self.train_idx[torch.randperm(len(self.train_idx), generator=g)]
        loss_sum = torch.zeros((), device=run.dev)
        for s in range(self.steps):
            idx = perm[s * p.batch_size : (s + 1) * p.batch_size]
            xb = run.batch(idx, p.aug, g)  # (B, 3, c, c) float, normalised, augmented
            yb = run.y[idx].to(run.dev, non_blocking=True)
            yb = yb * (1 - p.label_smoothing) + 0.5 * p.label_smoothing
            if p.mix != "none" and float(torch.rand((), generator=g)) < p.mix_prob:
                xb, yb = (mixup if p.mix == "mixup" else cutmix)(xb, yb, p.mix_alpha, g)
            with torch.autocast(run.dev.type, dtype=run.amp, enabled=run.amp is not None):
                logits = m(xb).squeeze(1)
            loss = binary_loss(
                logits.float(), yb, p.loss, p.focal_gamma, p.focal_alpha, p.pos_weight
            )
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            self.sched.step()
            if self.ema is not None:
                self.ema.update(m, step=self.sched.last_epoch)  # last_epoch: steps so far
            loss_sum += loss.detach()
        self.epoch += 1
        self.train_loss = float(loss_sum) / self.steps  # one sync per fold-epoch, not per step
        if not math.isfinite(self.train_loss):
            raise TrialDiverged(
                f"training loss is {self.train_loss} (fold {self.f})", self.epoch, asdict(p)
            )
        return self.steps * p.batch_size

    @property
    def scored(self) -> torch.nn.Module:
        """The weights scored, kept and submitted: the EMA's when ``ema`` is on."""
        return self.model if self.ema is None else self.ema.module

    def train_to(self, run: _Run, epoch: int, clock: _Clock, eval_batch: int) -> None:
        """Train and score epoch by epoch up to ``epoch`` (while active)."""
        while self.active and self.epoch < epoch:
            with clock.training(run.dev):
                clock.count(self.train_epoch(run))
            self.score(run, eval_batch)

    def score(self, run: _Run, eval_batch: int) -> None:
        """Held-out AUC, loss and accuracy; updates the best epoch and early stopping."""
        p = run.p
        probs = _predict(self.scored, run.batch, self.val_idx, eval_batch)
        if not np.isfinite(probs).all():
            raise TrialDiverged(f"non-finite predictions (fold {self.f})", self.epoch, asdict(p))
        yv = run.labels[self.val_idx]
        run.oof[self.val_idx] = probs
        pc = np.clip(probs, 1e-7, 1 - 1e-7)
        self.auc = _auc(yv, probs)
        self.loss = float(-np.mean(yv * np.log(pc) + (1 - yv) * np.log(1 - pc)))
        self.acc = float(np.mean((probs > 0.5) == yv))
        if self.auc > self.best_auc + MIN_DELTA or self.best_epoch == 0:
            self.best_auc, self.best_epoch, self.since = self.auc, self.epoch, 0
            run.oof_best[self.val_idx] = probs
            if p.restore_best:
                self.best_state = {
                    n: v.detach().cpu().clone() for n, v in self.scored.state_dict().items()
                }
        else:
            self.since += 1
            if p.patience and self.since >= p.patience:
                self.active = False


def fold_steps(k: int, epochs: int, race_epochs: int = 0) -> list[tuple[list[int], int]]:
    """The training order: (folds, epoch) steps, each followed by one report.

    A step trains each of its folds up to ``epoch``. Lockstep (``race_epochs`` 0): all k folds,
    one epoch per step. Racing: fold 0 alone for its first ``race_epochs`` epochs (one report
    each), then each other fold catches up to that epoch in one step (a report of the mean over
    the folds trained so far), then all k folds in lockstep. Steps list folds in order.
    """
    r = min(race_epochs, epochs)
    steps = [([0], e) for e in range(1, r + 1)] + [([f], r) for f in range(1, k)] if r else []
    return steps + [(list(range(k)), e) for e in range(r + 1, epochs + 1)]


def train_cv(
    params: dict | TrainParams,
    data: TrainData,
    folds: np.ndarray,
    *,
    epochs: int,
    device: str | torch.device | None = None,
    seed: int = 0,
    threads: int | None = None,
    pretrained: bool | str = False,
    on_epoch: Callable[[int, dict], bool] | None = None,
    keep_states: bool = False,
    keep_oof: bool = False,
    eval_batch: int = 1024,
    race_epochs: int = 0,
) -> CVResult:
    """Train one model per fold and score every fold's held-out part after each of its epochs.

    ``folds[i]`` is the fold (0..k-1) of ``data`` row i. Lockstep (default): after each epoch
    all k folds have trained it, and ``on_epoch(epoch, metrics)`` sees the mean over k folds.
    ``race_epochs=r`` (fold racing, the search's default): fold 0 trains its first r epochs
    alone, reported after each, then the other folds catch up to epoch r one report at a time
    (``metrics["folds"]`` says how many folds a mean covers, ``metrics["fold_epochs"]`` the
    fold-epochs spent), then lockstep (``fold_steps``). ``on_epoch`` returning True stops all
    folds. Raises ``TrialDiverged`` on a non-finite loss and ``TrialOutOfMemory`` on CUDA OOM,
    with the epoch and params.
    """
    p = params if isinstance(params, TrainParams) else TrainParams.from_dict(params)
    dev = resolve_device(device)
    if dev.type != "cuda" and threads:
        torch.set_num_threads(threads)
    folds = np.asarray(folds)
    k = int(folds.max()) + 1
    t_start = time.perf_counter()
    epoch, history, stopped = 0, [], False
    try:
        runs = [_Fold(f, p, folds, epochs, seed, dev, pretrained) for f in range(k)]
        norm = models.data_config(runs[0].model, p.arch)
        batch = _Batcher(data.images, p.crop, dev, norm["mean"], norm["std"])
        run = _Run(p, dev, batch, data.labels)
        clock = _Clock()
        steps = fold_steps(k, epochs, race_epochs)
        for i, (group, epoch) in enumerate(steps):
            clock.new_step()
            for f in group:
                runs[f].train_to(run, epoch, clock, eval_batch)
            seen = runs[: group[-1] + 1]  # folds that have reached this epoch (steps go in order)
            history.append(_metrics(epoch, seen, runs, p, clock, t_start))
            if on_epoch is not None and on_epoch(epoch, history[-1]) and i < len(steps) - 1:
                stopped = True
                break
            if len(seen) == k and not any(r.active for r in runs):  # all early-stopped
                break
    except torch.cuda.OutOfMemoryError as e:
        raise TrialOutOfMemory(f"CUDA out of memory ({e})", epoch, asdict(p)) from e
    return _result(runs, run, history, stopped, epochs, keep_states, keep_oof, dev, t_start)


class _Clock:
    """Training seconds and images (for img/s), excluding evaluation: in all and this step."""

    def __init__(self) -> None:
        self.seconds = self.images = self.last_seconds = self.last_images = 0.0

    def new_step(self) -> None:
        self.last_seconds = self.last_images = 0.0

    @contextlib.contextmanager
    def training(self, dev: torch.device):
        t0 = time.perf_counter()
        yield
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)  # CUDA kernels run asynchronously: wait to time them
        dt = time.perf_counter() - t0
        self.last_seconds += dt
        self.seconds += dt

    def count(self, images: int) -> None:
        self.last_images += images
        self.images += images


def _metrics(
    epoch: int, seen: list[_Fold], runs: list[_Fold], p: TrainParams, clock: _Clock, t_start
) -> dict:
    """One report: means over the folds in ``seen`` (all trained to ``epoch``, or stopped)."""
    aucs = [r.best_auc if p.restore_best and not r.active else r.auc for r in seen]
    losses, accs = [r.loss for r in seen], [r.acc for r in seen]
    train = [r.train_loss for r in seen]
    return {
        "epoch": epoch,
        "folds": len(seen),  # how many folds the means below average
        # compute spent, in fold-epochs: as scheduled (an early-stopped fold counts as trained,
        # so the clock is the same for every trial at the same point of the schedule)
        "fold_epochs": sum(epoch if r in seen else _reached(r, epoch) for r in runs),
        "auc": float(np.mean(aucs)),
        "auc_folds": aucs,
        "val_loss": float(np.mean(losses)),
        "val_loss_folds": losses,
        "acc": float(np.mean(accs)),
        "acc_folds": accs,
        "train_loss": float(np.mean(train)),
        "train_loss_folds": train,
        "lr": seen[0].sched.get_last_lr()[0],
        "seconds": time.perf_counter() - t_start,
        "train_images_per_s": clock.images / max(clock.seconds, 1e-9),  # all so far
        "epoch_images_per_s": clock.last_images / max(clock.last_seconds, 1e-9),  # last step
        "folds_active": sum(r.active for r in seen),
        "best_epochs": [r.best_epoch for r in seen],
        "self_stopped": len(seen) == len(runs) and not any(r.active for r in seen),
    }


def _reached(r: _Fold, epoch: int) -> int:
    """Fold-epochs a fold not yet caught up has trained (its own epochs, at most ``epoch``)."""
    return min(r.epoch, epoch)


def _result(runs, run, history, stopped, epochs, keep_states, keep_oof, dev, t_start):
    p = run.p
    if p.restore_best:
        for r in runs:
            if r.best_state is not None:
                r.scored.load_state_dict(r.best_state)
    states = None
    if keep_states:
        states = [{n: v.detach().cpu() for n, v in r.scored.state_dict().items()} for r in runs]
    last_epoch = history[-1]["epoch"] if history else 0
    return CVResult(
        history=history,
        stopped_early=stopped,
        self_stopped=not stopped and last_epoch < epochs and not any(r.active for r in runs),
        best_epochs=[r.best_epoch for r in runs],
        oof_best=run.oof_best if keep_oof else None,
        seconds=time.perf_counter() - t_start,
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev),
        states=states,
        oof=run.oof if keep_oof else None,
    )


@torch.no_grad()
def _predict(model, batch: _Batcher, rows: np.ndarray, eval_batch: int) -> np.ndarray:
    """Probabilities for ``rows`` (no augmentation), in chunks of ``eval_batch``."""
    model.eval()
    rows_t = torch.from_numpy(rows)
    out = [
        probabilities(model, batch(rows_t[s : s + eval_batch])).cpu()
        for s in range(0, len(rows), eval_batch)
    ]
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def epochs_that_fit(done: int, planned: int, seconds_per_epoch: float, left_s: float) -> int:
    """A schedule's length in epochs once ``done`` of ``planned`` are trained and ``left_s``
    seconds remain at ``seconds_per_epoch``: ``planned`` if the rest fits, else fewer, but
    at least one more, so the lr still anneals to its end (a model cut mid-schedule would
    be submitted at a high lr)."""
    if done >= planned:
        return done
    fit = done + int(max(left_s, 0.0) // max(seconds_per_epoch, 1e-9))
    return max(done + 1, min(planned, fit))


def train_full(
    params: dict | TrainParams,
    data: TrainData,
    *,
    epochs: int,
    seeds: list[int] | tuple[int, ...] = (0,),
    device: str | torch.device | None = None,
    threads: int | None = None,
    pretrained: bool | str = False,
    on_epoch: Callable[[int, int, int], None] | None = None,
    seconds: float | None = None,
) -> list[dict]:
    """Train one model per seed on every row of ``data`` for ``epochs``; their CPU state_dicts.

    Nothing is held out, so nothing is scored: these are final models whose quality was
    estimated by the cross-validation of the same params (the fold models). ``on_epoch(i,
    epoch, epochs_i)`` is called after epoch ``epoch`` of model ``i``, whose schedule is
    ``epochs_i`` long. ``seconds``: wall time all models may take (a ``--budget``'s
    reserve); when a model's pace says its epochs would run past its equal share, its
    schedule is shortened to what fits (``epochs_that_fit``). Raises like ``train_cv``.
    """
    p = params if isinstance(params, TrainParams) else TrainParams.from_dict(params)
    dev = resolve_device(device)
    if dev.type != "cuda" and threads:
        torch.set_num_threads(threads)
    every = np.ones(len(data.labels), np.int64)  # "fold 0" then trains on every row
    states, batch, run = [], None, None
    t0 = time.perf_counter()
    try:
        for i, seed in enumerate(seeds):
            fold = _Fold(0, p, every, epochs, seed, dev, pretrained)
            if run is None:
                norm = models.data_config(fold.model, p.arch)
                batch = _Batcher(data.images, p.crop, dev, norm["mean"], norm["std"])
                run = _Run(p, dev, batch, data.labels)
            t_start = time.perf_counter()
            while fold.epoch < fold.epochs:
                fold.train_epoch(run)
                # model i ends by its share, (i + 1) / n of the seconds; a schedule that has
                # run to its end stays ended (its lr is at 0)
                if seconds is not None and fold.epoch < fold.epochs:
                    now = time.perf_counter()
                    left = t0 + seconds * (i + 1) / len(seeds) - now
                    per_epoch = (now - t_start) / max(1, fold.epoch - 1)
                    # the plan, not the last length, caps it: the pace can recover
                    fold.epochs = epochs_that_fit(fold.epoch, epochs, per_epoch, left)
                if fold.epoch == 1:  # the pace is timed from here: epoch 1 has one-off setup
                    t_start = time.perf_counter()
                if on_epoch is not None:
                    on_epoch(i, fold.epoch, fold.epochs)
            states.append({n: v.detach().cpu() for n, v in fold.scored.state_dict().items()})
    except torch.cuda.OutOfMemoryError as e:
        raise TrialOutOfMemory(f"CUDA out of memory ({e})", epochs, asdict(p)) from e
    return states
