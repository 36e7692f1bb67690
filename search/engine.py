"""The cross-validation training engine: the only code in the project that trains a model.

``train_cv(params, data, folds, epochs=...)`` trains the k fold models in lockstep, epoch by
epoch: after epoch e every fold has trained e epochs and been scored on its held-out part, so
the caller (a Ray trial, refit, a test) sees the mean and per-fold AUC and may stop all folds at
once. Read it top to bottom: set up data and models, then loop epochs -> folds -> batches.

Data: the cached uint8 patches are centre-cropped once and kept whole in RAM (or on the GPU
when they fit); batches are random index sets, augmented as whole tensors (``search.augment``).
CUDA: AMP (bf16 where supported), channels_last, non-blocking copies. CPU: channels_last too
(measured faster with oneDNN), ``threads`` threads.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

import models
from search.augment import augment, cutmix, mixup
from search.losses import LOSSES, binary_loss

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
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
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay to 0 at the last epoch
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
        if p.mix not in MIXES:
            raise ValueError(f"mix must be one of {MIXES}, got {p.mix!r}")
        if p.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {p.loss!r}")
        if p.patience < 0 or p.mix_alpha < 0 or not 0 <= p.mix_prob <= 1 or p.pos_weight <= 0:
            raise ValueError(f"invalid params {params}")
        return p


@dataclass(frozen=True)
class TrainData:
    """Patches and labels of the labelled pool: images (N, 96, 96, 3) uint8, labels (N,)."""

    images: np.ndarray
    labels: np.ndarray
    ids: np.ndarray | None = None

    @classmethod
    def from_cache(cls, cache, rows: np.ndarray | None = None) -> TrainData:
        """Rows of a ``data_pipeline.Cache`` (default: its labelled pool), read into RAM."""
        rows = cache.labelled_pool() if rows is None else np.asarray(rows)
        return cls(
            images=np.ascontiguousarray(cache.images[rows]),
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

    history: list[dict]  # one dict per epoch (see ``_epoch_metrics``)
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
        return len(self.history)

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


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to 1 over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def centre_crop(images: np.ndarray, crop: int) -> torch.Tensor:
    """(N, 96, 96, 3) uint8 -> (N, crop, crop, 3) uint8 tensor, contiguous, in RAM.

    Kept channels-last (NHWC): ``.permute(0, 3, 1, 2)`` of it is already the channels_last
    memory format convolutions want, so batches need no layout copy.
    """
    o = (images.shape[1] - crop) // 2
    return torch.from_numpy(np.ascontiguousarray(images[:, o : o + crop, o : o + crop]))


class _Batcher:
    """Turns index batches into normalised float input on the device."""

    def __init__(self, x: torch.Tensor, device: torch.device, mean, std) -> None:
        self.x, self.device = x, device
        self.cuda = device.type == "cuda"
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    def __call__(
        self, idx: torch.Tensor, aug: float = 0.0, gen: torch.Generator | None = None
    ) -> torch.Tensor:
        xb = self.x[idx.to(self.x.device)]  # (B, c, c, 3) uint8
        if xb.device != self.device:
            xb = xb.pin_memory().to(self.device, non_blocking=True) if self.cuda else xb
        xb = xb.permute(0, 3, 1, 2).float().div_(255)  # (B, 3, c, c) in [0, 1]
        if aug > 0:
            xb = augment(xb, aug, gen)
        xb = (xb - self.mean) / self.std
        return xb.contiguous(memory_format=torch.channels_last)  # a no-op: NHWC already


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")


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
) -> CVResult:
    """Train one model per fold, in lockstep; evaluate every fold's held-out part each epoch.

    ``folds[i]`` is the fold (0..k-1) of ``data`` row i; fold f's model trains on the other
    folds and is scored on fold f. ``on_epoch(epoch, metrics)`` is called after each epoch
    (1-based) and stops training when it returns True. Raises ``TrialDiverged`` on a
    non-finite loss and ``TrialOutOfMemory`` on CUDA OOM, with the epoch and params.
    """
    p = params if isinstance(params, TrainParams) else TrainParams.from_dict(params)
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    if not cuda and threads:
        torch.set_num_threads(threads)
    folds = np.asarray(folds)
    k = int(folds.max()) + 1
    t_start = time.perf_counter()
    epoch = 0
    try:
        # ---- data: crop once, whole array in RAM, on the GPU too when it fits easily
        x = centre_crop(data.images, p.crop)
        if cuda and x.numel() < 0.25 * torch.cuda.mem_get_info(dev)[0]:
            x = x.to(dev)
        y = torch.as_tensor(data.labels, dtype=torch.float32)
        amp = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
        scaler = torch.amp.GradScaler("cuda", enabled=cuda and amp == torch.float16)

        # ---- one model, optimizer, schedule and RNG per fold
        fold_models, opts, scheds, gens, train_idx, val_idx = [], [], [], [], [], []
        for f in range(k):
            torch.manual_seed(seed * 1000 + f)  # same seed -> same init per fold
            m = create_model(p, pretrained)
            m = m.to(dev, memory_format=torch.channels_last)  # faster on CUDA and oneDNN CPU
            tr = torch.from_numpy(np.flatnonzero(folds != f))
            steps = max(1, len(tr) // p.batch_size)  # drop_last: no BatchNorm on 1-2 samples
            opt = _make_optimizer(p, [q for q in m.parameters() if q.requires_grad])
            warm, total = round(p.warmup_epochs * steps), epochs * steps
            scheds.append(
                torch.optim.lr_scheduler.LambdaLR(
                    opt, lambda s, w=warm, t=total: lr_factor(s, w, t)
                )
            )
            fold_models.append(m)
            opts.append(opt)
            gens.append(torch.Generator().manual_seed(seed * 1000 + f))
            train_idx.append(tr)
            val_idx.append(np.flatnonzero(folds == f))
        norm = models.data_config(fold_models[0], p.arch)
        batch = _Batcher(x, dev, norm["mean"], norm["std"])

        history: list[dict] = []
        oof = np.full(len(folds), np.nan, dtype=np.float32)
        oof_best = np.full(len(folds), np.nan, dtype=np.float32)
        stopped = self_stopped = False
        # early stopping, per fold: a fold stops after `patience` epochs without a better
        # held-out AUC; a stopped fold keeps reporting its final (or, restored, best) AUC
        active = [True] * k
        best_auc, best_epoch, since = [-math.inf] * k, [0] * k, [0] * k
        best_states: list[dict | None] = [None] * k
        last = {
            "auc": [math.nan] * k,
            "loss": [math.nan] * k,
            "acc": [math.nan] * k,
            "train": [math.nan] * k,
        }
        train_seconds, images_seen = 0.0, 0
        for epoch in range(1, epochs + 1):
            # ---- train every fold one epoch
            t0 = time.perf_counter()
            train_loss = []
            images_epoch = 0
            for f in range(k):
                if not active[f]:
                    train_loss.append(last["train"][f])
                    continue
                m, opt, sched, g, tr = fold_models[f], opts[f], scheds[f], gens[f], train_idx[f]
                m.train()
                perm = tr[torch.randperm(len(tr), generator=g)]
                steps = max(1, len(tr) // p.batch_size)
                loss_sum = torch.zeros((), device=dev)
                for s in range(steps):
                    idx = perm[s * p.batch_size : (s + 1) * p.batch_size]
                    xb = batch(idx, p.aug, g)
                    yb = y[idx].to(dev, non_blocking=True)
                    yb = yb * (1 - p.label_smoothing) + 0.5 * p.label_smoothing
                    if p.mix != "none" and float(torch.rand((), generator=g)) < p.mix_prob:
                        xb, yb = (mixup if p.mix == "mixup" else cutmix)(xb, yb, p.mix_alpha, g)
                    with torch.autocast(dev.type, dtype=amp, enabled=cuda):
                        logits = m(xb).squeeze(1)
                    loss = binary_loss(
                        logits.float(), yb, p.loss, p.focal_gamma, p.focal_alpha, p.pos_weight
                    )
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                    sched.step()
                    loss_sum += loss.detach()
                    images_epoch += len(idx)
                mean_loss = float(loss_sum) / steps  # one sync per fold-epoch, not per step
                if not math.isfinite(mean_loss):
                    raise TrialDiverged(
                        f"training loss is {mean_loss} (fold {f})", epoch, asdict(p)
                    )
                train_loss.append(mean_loss)
                last["train"][f] = mean_loss
            images_seen += images_epoch
            if cuda:
                torch.cuda.synchronize(dev)
            epoch_seconds = time.perf_counter() - t0
            train_seconds += epoch_seconds

            # ---- score every fold on its held-out part
            for f in range(k):
                if not active[f]:
                    continue
                probs = _predict(fold_models[f], batch, val_idx[f], dev, amp, eval_batch)
                if not np.isfinite(probs).all():
                    raise TrialDiverged(f"non-finite predictions (fold {f})", epoch, asdict(p))
                yv = data.labels[val_idx[f]]
                oof[val_idx[f]] = probs
                auc = _auc(yv, probs)
                pc = np.clip(probs, 1e-7, 1 - 1e-7)
                last["auc"][f] = auc
                last["loss"][f] = float(-np.mean(yv * np.log(pc) + (1 - yv) * np.log(1 - pc)))
                last["acc"][f] = float(np.mean((probs > 0.5) == yv))
                if auc > best_auc[f] + MIN_DELTA or best_epoch[f] == 0:
                    best_auc[f], best_epoch[f], since[f] = auc, epoch, 0
                    oof_best[val_idx[f]] = probs
                    if p.restore_best:  # a CPU copy of this epoch's weights
                        best_states[f] = {
                            n: v.detach().cpu().clone()
                            for n, v in fold_models[f].state_dict().items()
                        }
                else:
                    since[f] += 1
                    if p.patience and since[f] >= p.patience:
                        active[f] = False
            # a stopped fold reports its final AUC, or its best when its best weights are kept
            aucs = [
                best_auc[f] if p.restore_best and not active[f] else last["auc"][f]
                for f in range(k)
            ]
            losses, accs = list(last["loss"]), list(last["acc"])
            metrics = {
                "epoch": epoch,
                "auc": float(np.mean(aucs)),
                "auc_folds": aucs,
                "val_loss": float(np.mean(losses)),
                "val_loss_folds": losses,
                "acc": float(np.mean(accs)),
                "acc_folds": accs,
                "train_loss": float(np.mean(train_loss)),
                "train_loss_folds": train_loss,
                "lr": scheds[0].get_last_lr()[0],
                "seconds": time.perf_counter() - t_start,
                "train_images_per_s": images_seen / max(train_seconds, 1e-9),  # all epochs
                "epoch_images_per_s": images_epoch / max(epoch_seconds, 1e-9),  # this epoch
                "folds_active": sum(active),
                "best_epochs": list(best_epoch),
                "self_stopped": not any(active) and epoch < epochs,
            }
            history.append(metrics)
            if on_epoch is not None and on_epoch(epoch, metrics) and epoch < epochs:
                stopped = True
                break
            if not any(active):  # every fold early-stopped
                self_stopped = epoch < epochs
                break
    except torch.cuda.OutOfMemoryError as e:
        raise TrialOutOfMemory(f"CUDA out of memory ({e})", epoch, asdict(p)) from e

    if p.restore_best:
        for m, sd in zip(fold_models, best_states, strict=True):
            if sd is not None:
                m.load_state_dict(sd)
    states = None
    if keep_states:
        states = [{n: v.detach().cpu() for n, v in m.state_dict().items()} for m in fold_models]
    return CVResult(
        history=history,
        stopped_early=stopped,
        self_stopped=self_stopped,
        best_epochs=list(best_epoch),
        oof_best=oof_best if keep_oof else None,
        seconds=time.perf_counter() - t_start,
        device=str(dev) if not cuda else torch.cuda.get_device_name(dev),
        states=states,
        oof=oof if keep_oof else None,
    )


@torch.no_grad()
def _predict(model, batch: _Batcher, rows: np.ndarray, dev, amp, eval_batch: int) -> np.ndarray:
    """Probabilities for ``rows`` (no augmentation), in chunks of ``eval_batch``."""
    model.eval()
    out = []
    rows_t = torch.from_numpy(rows)
    for s in range(0, len(rows), eval_batch):
        with torch.autocast(dev.type, dtype=amp, enabled=dev.type == "cuda"):
            logits = model(batch(rows_t[s : s + eval_batch])).squeeze(1)
        out.append(torch.sigmoid(logits.float()).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)
