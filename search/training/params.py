"""What a trial trains with: ``TrainParams`` and its allowed values. No torch here: the
search space, the CLIs and the study records read params without loading a framework."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields

import numpy as np

LOSSES = ("bce", "focal")
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
    # weight decay on 1-D params (BatchNorm weights and biases) too; False = timm's default
    # (param_groups_weight_decay): only conv and linear weights are decayed
    decay_norms: bool = False

    @classmethod
    def from_dict(cls, params: dict) -> TrainParams:
        """Build from a dict; unknown keys or invalid values are a clear error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown training params {unknown}; known: {sorted(known)}")
        for name, v in params.items():
            want = type(getattr(cls, name))  # the default's type: str, int, float or bool
            if not _is_type(v, want):
                raise ValueError(f"{name} must be of type {want.__name__}, got {v!r}")
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
        if p.width < 1 or p.depth < 1:
            raise ValueError(f"width and depth must be >= 1, got {p.width}, {p.depth}")
        if p.arch == "simple_cnn" and p.crop < 2**p.depth:  # each block halves the patch
            raise ValueError(
                f"depth {p.depth} is too deep for crop {p.crop}: each block halves the patch, "
                f"so {p.crop} px allows at most {p.crop.bit_length() - 1} blocks"
            )
        return p


def _is_type(v: object, want: type) -> bool:
    """Whether ``v`` may fill a ``want`` field: ints for float fields too, numpy scalars
    too, but a bool is no number and a "64" no int."""
    flag = isinstance(v, bool | np.bool_)
    if want is bool:
        return flag
    if want is int:
        return isinstance(v, numbers.Integral) and not flag
    if want is float:
        return isinstance(v, numbers.Real) and not flag
    return isinstance(v, want)
