"""What training returns and raises: ``CVResult``, and the errors a trial records."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
