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
crops them, a batch ahead in a background thread on CUDA. On a GPU whose trial share has room
(the memory plan, ``search.training.device``) the cropped pool is copied to the device once
per trial and batches are gathered there. Batches are augmented as whole tensors
(``search.training.augment``); a training step makes no blocking host<->device transfer.
CUDA: autocast in bf16 where native, else fp16 with loss scaling; channels_last; cuDNN
autotuning. CPU: channels_last too (measured faster with oneDNN), ``threads`` threads, bf16
autocast on CPUs with AMX units (``cpu_bf16``; ``PCAM_AMP=off`` for fp32).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from timm.optim import param_groups_weight_decay
from timm.utils import ModelEmaV3

import models
from search.training.augment import apply_mix, augment, draw_mixes
from search.training.data import PROBE_BYTES, PoolImages, TrainData  # noqa: F401
from search.training.device import (
    AMP_ENV,
    PoolPlan,
    amp_dtype,
    configure,
    cpu_bf16,
    estimate_trial_bytes,
    plan_pool,
    pool_bytes,
    precision,
    release,
    share_bytes,
)
from search.training.losses import binary_loss
from search.training.metrics import auc
from search.training.params import (  # noqa: F401  (re-exported: callers import them here)
    CROPS,
    LOSSES,
    MIN_DELTA,
    MIXES,
    ONECYCLE_PCT,
    OPTIMIZERS,
    SCHEDULES,
    TrainParams,
)

__all__ = ["AMP_ENV", "cpu_bf16", "precision"]  # re-exported: callers import them from here


class TrialError(RuntimeError):
    """A trial failed for a reason the search records (error type + message in user attrs)."""

    def __init__(self, message: str, epoch: int, params: dict) -> None:
        super().__init__(f"{message} at epoch {epoch} with params {params}")
        self.message, self.epoch, self.params = message, epoch, params

    def __reduce__(self) -> tuple[type, tuple[str, int, dict]]:
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
    pool: str = "host"  # where the patch pool was: "device" (copied once) or "host"
    pool_note: str = ""  # why it is not where the memory plan put it (out of memory), if so

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


def _param_groups(p: TrainParams, model: torch.nn.Module) -> list:
    """The trainable params, with weight decay on conv/linear weights only (timm's groups:
    decaying BatchNorm scales and biases pulls them to 0, which no L2 prior asks for), or on
    every param with ``decay_norms``."""
    if p.decay_norms:
        return [q for q in model.parameters() if q.requires_grad]
    return param_groups_weight_decay(model, p.weight_decay)


def _make_optimizer(p: TrainParams, params: list) -> torch.optim.Optimizer:
    """torch's optimizer for ``p`` (torch's defaults, RMSprop's alpha 0.99 included);
    ``params``: a list of tensors or of param groups (``_param_groups``)."""
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


class _Batcher:
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
            self.note = f"the patch pool did not fit on the device ({_first_line(e)}): host path"
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


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def to_unit(xb: torch.Tensor) -> torch.Tensor:
    """(B, c, c, 3) uint8 -> (B, 3, c, c) float in [0, 1] (a view of the NHWC batch, so it
    stays channels_last in memory)."""
    return xb.permute(0, 3, 1, 2).float().div_(255)


def normalise(xb: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, 3, c, c) floats in [0, 1] -> the model's input: standardised, channels_last (a
    no-op for a permuted NHWC batch). Training, OOF and test predictions all go through it."""
    return ((xb - mean) / std).contiguous(memory_format=torch.channels_last)


def probabilities(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B,) float32 sigmoid probabilities of a binary ``model`` on input ``x``, under the
    device's autocast rule (``search.training.device.amp_dtype``: bf16 where the device runs it
    natively, fp16 on older GPUs, else fp32).
    The one inference step: OOF scoring in training and the saved ensemble's test
    predictions share it, so both see the same numerics."""
    amp = amp_dtype(x.device)
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        logits = model(x).squeeze(1)
    return torch.sigmoid(logits.float())


def plan_pool_for(p: TrainParams, n: int, k: int, dev: torch.device, gpu_share: float) -> PoolPlan:
    """Where a trial of ``p`` with k folds over ``n`` patches keeps its pool on ``dev``: the
    memory plan on CUDA (``search.training.device.plan_pool``), the host elsewhere."""
    if dev.type != "cuda":
        return PoolPlan("host", "not a GPU: batches gather from the memory-mapped cache")
    with torch.device("meta"):  # shapes only: no memory, no weights read
        model = create_model(p).to(memory_format=torch.channels_last)
    trial = estimate_trial_bytes(model, p.optimizer, p.ema > 0, k, p.batch_size, p.crop)
    return plan_pool(share_bytes(dev, gpu_share), pool_bytes(n, p.crop), trial)


class _FoldRNG:
    """A fold's own random stream: states of the default CPU and (on CUDA) device generators,
    swapped in while the fold trains and out after. Every draw in its training (order,
    augmentation, MixUp/CutMix, dropout) comes from it, so a fold's result does not depend
    on how folds interleave (racing or lockstep) or on what else ran in the process."""

    def __init__(self, dev: torch.device) -> None:
        # called right after torch.manual_seed(fold seed) and the model's init
        self.dev = dev
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        outer = torch.get_rng_state()
        outer_cuda = torch.cuda.get_rng_state(self.dev) if self.cuda is not None else None
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.dev)
        try:
            yield
        finally:
            self.cpu = torch.get_rng_state()
            torch.set_rng_state(outer)
            if outer_cuda is not None:  # set iff this fold has a CUDA stream
                self.cuda = torch.cuda.get_rng_state(self.dev)
                torch.cuda.set_rng_state(outer_cuda, self.dev)


class _Run:
    """What every fold of one ``train_cv`` call shares: params, device, batches, labels."""

    def __init__(self, p: TrainParams, dev: torch.device, batch: _Batcher, labels: np.ndarray):
        self.p, self.dev, self.batch, self.labels = p, dev, batch, labels
        self.cuda = dev.type == "cuda"
        self.amp = amp_dtype(dev)
        # made once: a tensor built from a Python float inside a step is a blocking copy
        self.pos_weight = torch.tensor(p.pos_weight, device=dev) if p.pos_weight != 1.0 else None
        self.oof = np.full(len(labels), np.nan, dtype=np.float32)  # last scored epoch
        self.oof_best = np.full(len(labels), np.nan, dtype=np.float32)  # best epoch per fold


class _Fold:
    """One fold: its model, optimizer, schedule, RNG, rows, latest metrics and best-so-far.

    Fold ``f`` trains on the rows of the other folds and is scored on its own.
    """

    def __init__(
        self,
        f: int,
        p: TrainParams,
        folds: np.ndarray,
        epochs: int,
        seed: int,
        dev: torch.device,
        pretrained: bool | str,
    ) -> None:
        self.f = f
        # the process's own stream is left as it was: the fold's is forked from it
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed * 1000 + f)  # same seed -> same init per fold
            self.model = create_model(p, pretrained).to(dev).to(memory_format=torch.channels_last)
            self.rng = _FoldRNG(dev)  # the fold's stream from here on: seed + init
        self.train_idx = np.flatnonzero(folds != f)
        self.train_idx_dev: torch.Tensor | None = None  # on the device with a device pool
        self.val_idx = np.flatnonzero(folds == f)
        self.steps = max(1, len(self.train_idx) // p.batch_size)  # drop_last: BN on 1-2 samples
        self.opt = _make_optimizer(p, _param_groups(p, self.model))
        # timm's warm-up ramps the decay up from 0 (1 - (1 + step)^(-2/3), at most p.ema), so
        # a short run's EMA is not dominated by the random init
        self.ema = ModelEmaV3(self.model, decay=p.ema, use_warmup=True) if p.ema else None
        warm = round(p.warmup_epochs * self.steps)
        self.epochs = epochs  # the schedule's length; train_full may shorten it (a deadline)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, warm, self.epochs * self.steps, p.schedule)
        )
        # float16 autocast needs loss scaling; bf16 and fp32 do not
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype(dev) == torch.float16)
        self.epoch = 0  # epochs trained
        self.active = True  # False once early stopping (patience) ended this fold
        self.auc = self.loss = self.acc = self.train_loss = math.nan  # latest epoch
        self.best_auc, self.best_epoch, self.since = -math.inf, 0, 0
        self.best_state: dict | None = None  # CPU copy of the best epoch's weights

    def train_epoch(self, run: _Run) -> int:
        """One pass over this fold's training rows; returns the images seen. Every draw comes
        from the fold's own stream; no step waits on the host (no blocking copy, no read of a
        device value): per-step random choices are drawn on the host once per epoch, device
        randomness on the device."""
        p, m, batch = run.p, self.model, run.batch
        m.train()
        if self.train_idx_dev is None:
            self.train_idx_dev = batch.rows_on_device(self.train_idx)
        with self.rng.active():
            mixes = draw_mixes(p.mix, p.mix_prob, p.mix_alpha, self.steps, p.crop)
            loss_sum = torch.zeros((), device=run.dev)
            batches = batch.epoch(self.train_idx, self.train_idx_dev, self.steps, p.batch_size)
            for s, (xb, yb) in enumerate(batches):
                xb = batch.inputs(xb, p.aug)  # (B, 3, c, c) float, normalised, augmented
                yb = yb * (1 - p.label_smoothing) + 0.5 * p.label_smoothing
                mix = mixes[s]
                if mix is not None:
                    xb, yb = apply_mix(xb, yb, mix)
                with torch.autocast(run.dev.type, dtype=run.amp, enabled=run.amp is not None):
                    logits = m(xb).squeeze(1)
                loss = binary_loss(
                    logits.float(), yb, p.loss, p.focal_gamma, p.focal_alpha, run.pos_weight
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
        self.auc = auc(yv, probs)
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
    gpu_share: float = 1.0,
    pool: str | None = None,
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

    ``gpu_share``: the trial's share of the GPU (``--gpus-per-trial``), what the memory plan
    (``plan_pool_for``) may use; ``pool`` ("device"/"host") overrides the plan. A device
    pool that runs out of memory before the first report is dropped and the trial restarts
    on the host path (same seeds, so the same result), saying so in ``CVResult.pool_note``.
    """
    p = params if isinstance(params, TrainParams) else TrainParams.from_dict(params)
    dev = resolve_device(device)
    configure(dev, threads)
    folds = np.asarray(folds)
    k = int(folds.max()) + 1
    place = plan_pool_for(p, len(data.labels), k, dev, gpu_share).where if pool is None else pool
    args = (p, data, folds, epochs, dev, seed, pretrained, on_epoch, eval_batch, race_epochs)
    trained, note = _host_if_pool_oom(lambda where: _train_cv(*args, where), place, dev)
    return _finish(trained, keep_states, keep_oof, note)


_T = TypeVar("_T")


class _PoolOutOfMemory(RuntimeError):
    """CUDA ran out of memory with the pool on the device, before anything was reported."""


def _host_if_pool_oom(train: Callable[[str], _T], place: str, dev: torch.device) -> tuple[_T, str]:
    """(``train(place)``, "") - or, when the device pool ran out of memory before the first
    report, (``train("host")``, why): same seeds, same result. The device's cached blocks
    are released after either (reused Ray actors: the next trial finds them free)."""
    try:
        try:
            return train(place), ""
        except _PoolOutOfMemory as e:
            release(dev)
            note = f"the device pool ran out of memory before the first report ({e}): host path"
            logging.getLogger(__name__).warning(note)
            return train("host"), note
    finally:
        release(dev)


@dataclass
class _Trained:
    """What ``_train_cv`` leaves for ``_finish``: the folds and their shared state."""

    runs: list
    run: _Run
    history: list[dict]
    stopped: bool
    epochs: int
    t_start: float


def _train_cv(
    p: TrainParams,
    data: TrainData,
    folds: np.ndarray,
    epochs: int,
    dev: torch.device,
    seed: int,
    pretrained: bool | str,
    on_epoch: Callable[[int, dict], bool] | None,
    eval_batch: int,
    race: int,
    place: str,
) -> _Trained:
    """``train_cv``'s loop with the pool at ``place``; returns the trained folds."""
    k = int(folds.max()) + 1
    t_start = time.perf_counter()
    epoch, history, stopped, batch = 0, [], False, None
    try:
        runs = [_Fold(f, p, folds, epochs, seed, dev, pretrained) for f in range(k)]
        norm = models.data_config(runs[0].model, p.arch)
        batch = _Batcher(data.images, data.labels, p.crop, dev, norm["mean"], norm["std"], place)
        run = _Run(p, dev, batch, data.labels)
        clock = _Clock()
        steps = fold_steps(k, epochs, race)
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
        if batch is not None and batch.place == "device" and not history:
            raise _PoolOutOfMemory(_first_line(e)) from e
        raise TrialOutOfMemory(f"CUDA out of memory ({e})", epoch, asdict(p)) from e
    return _Trained(runs, run, history, stopped, epochs, t_start)


class _Clock:
    """Training seconds and images (for img/s), excluding evaluation: in all and this step."""

    def __init__(self) -> None:
        self.seconds = self.images = self.last_seconds = self.last_images = 0.0

    def new_step(self) -> None:
        self.last_seconds = self.last_images = 0.0

    @contextlib.contextmanager
    def training(self, dev: torch.device) -> Iterator[None]:
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
    epoch: int, seen: list[_Fold], runs: list[_Fold], p: TrainParams, clock: _Clock, t_start: float
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


def _finish(t: _Trained, keep_states: bool, keep_oof: bool, note: str = "") -> CVResult:
    runs, run, history, p = t.runs, t.run, t.history, t.run.p
    if p.restore_best:
        for r in runs:
            if r.best_state is not None:
                r.scored.load_state_dict(r.best_state)
    states = None
    if keep_states:
        states = [{n: v.detach().cpu() for n, v in r.scored.state_dict().items()} for r in runs]
    last_epoch = history[-1]["epoch"] if history else 0
    dev = run.dev
    return CVResult(
        history=history,
        stopped_early=t.stopped,
        self_stopped=not t.stopped and last_epoch < t.epochs and not any(r.active for r in runs),
        best_epochs=[r.best_epoch for r in runs],
        oof_best=run.oof_best if keep_oof else None,
        seconds=time.perf_counter() - t.t_start,
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev),
        states=states,
        oof=run.oof if keep_oof else None,
        pool=run.batch.place,
        pool_note=note or run.batch.note,
    )


@torch.no_grad()
def _predict(
    model: torch.nn.Module, batch: _Batcher, rows: np.ndarray, eval_batch: int
) -> np.ndarray:
    """Probabilities for ``rows`` (no augmentation), in chunks of ``eval_batch``."""
    model.eval()
    out = [
        probabilities(model, batch(rows[s : s + eval_batch])).cpu()
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
    configure(dev, threads)
    place = plan_pool_for(p, len(data.labels), 1, dev, 1.0).where
    args = (p, data, epochs, seeds, dev, pretrained, on_epoch, seconds)
    return _host_if_pool_oom(lambda where: _train_full(*args, where), place, dev)[0]


def _train_full(
    p: TrainParams,
    data: TrainData,
    epochs: int,
    seeds: list[int] | tuple[int, ...],
    dev: torch.device,
    pretrained: bool | str,
    on_epoch: Callable[[int, int, int], None] | None,
    seconds: float | None,
    place: str,
) -> list[dict]:
    """``train_full``'s loop with the pool at ``place``."""
    every = np.ones(len(data.labels), np.int64)  # "fold 0" then trains on every row
    states, batch, run = [], None, None
    t0 = time.perf_counter()
    try:
        for i, seed in enumerate(seeds):
            fold = _Fold(0, p, every, epochs, seed, dev, pretrained)
            if run is None:
                norm = models.data_config(fold.model, p.arch)
                m, sd = norm["mean"], norm["std"]
                batch = _Batcher(data.images, data.labels, p.crop, dev, m, sd, place)
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
        if batch is not None and batch.place == "device" and not states and fold.epoch == 0:
            raise _PoolOutOfMemory(_first_line(e)) from e
        raise TrialOutOfMemory(f"CUDA out of memory ({e})", epochs, asdict(p)) from e
    return states
