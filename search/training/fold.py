"""One fold of a cross-validated trial: its model, optimizer, schedule and random stream
(``Fold``), trained an epoch at a time and scored on its held-out rows; the model and
optimizer factories, and the timing clock the reports read."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import asdict

import numpy as np
import torch
from timm.optim import param_groups_weight_decay
from timm.utils import ModelEmaV3

import models
from search.training.augment import apply_mix, draw_mixes
from search.training.batches import Batcher
from search.training.device import (
    amp_dtype,
)
from search.training.losses import binary_loss
from search.training.metrics import auc
from search.training.params import (
    MIN_DELTA,
    ONECYCLE_PCT,
    TrainParams,
)
from search.training.results import TrialDiverged


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


class Run:
    """What every fold of one ``train_cv`` call shares: params, device, batches, labels."""

    def __init__(self, p: TrainParams, dev: torch.device, batch: Batcher, labels: np.ndarray):
        self.p, self.dev, self.batch, self.labels = p, dev, batch, labels
        self.cuda = dev.type == "cuda"
        self.amp = amp_dtype(dev)
        # made once: a tensor built from a Python float inside a step is a blocking copy
        self.pos_weight = torch.tensor(p.pos_weight, device=dev) if p.pos_weight != 1.0 else None
        self.oof = np.full(len(labels), np.nan, dtype=np.float32)  # last scored epoch
        self.oof_best = np.full(len(labels), np.nan, dtype=np.float32)  # best epoch per fold


class Fold:
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

    def train_epoch(self, run: Run) -> int:
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

    def state_dict(self) -> dict:
        """Everything that makes this fold's next epoch what it would have been: weights,
        optimizer, schedule, loss scaler, EMA, random stream, progress and best-so-far."""
        return {
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "rng_cpu": self.rng.cpu,
            "rng_cuda": self.rng.cuda,
            "epoch": self.epoch,
            "active": self.active,
            "latest": [self.auc, self.loss, self.acc, self.train_loss],
            "best": [self.best_auc, self.best_epoch, self.since],
            "best_state": self.best_state,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()``'s output (same params, folds and device type)."""
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.rng.cpu = state["rng_cpu"]
        if self.rng.cuda is not None and state["rng_cuda"] is not None:
            self.rng.cuda = state["rng_cuda"]
        self.epoch, self.active = int(state["epoch"]), bool(state["active"])
        self.auc, self.loss, self.acc, self.train_loss = (float(v) for v in state["latest"])
        best_auc, best_epoch, since = state["best"]
        self.best_auc, self.best_epoch, self.since = float(best_auc), int(best_epoch), int(since)
        self.best_state = state["best_state"]

    @property
    def scored(self) -> torch.nn.Module:
        """The weights scored, kept and submitted: the EMA's when ``ema`` is on."""
        return self.model if self.ema is None else self.ema.module

    def train_to(self, run: Run, epoch: int, clock: Clock, eval_batch: int) -> None:
        """Train and score epoch by epoch up to ``epoch`` (while active)."""
        while self.active and self.epoch < epoch:
            with clock.training(run.dev):
                clock.count(self.train_epoch(run))
            self.score(run, eval_batch)

    def score(self, run: Run, eval_batch: int) -> None:
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


class Clock:
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


@torch.no_grad()
def _predict(
    model: torch.nn.Module, batch: Batcher, rows: np.ndarray, eval_batch: int
) -> np.ndarray:
    """Probabilities for ``rows`` (no augmentation), in chunks of ``eval_batch``."""
    model.eval()
    out = [
        probabilities(model, batch(rows[s : s + eval_batch])).cpu()
        for s in range(0, len(rows), eval_batch)
    ]
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)
