"""What runs inside a Ray trial: the trainable (one ``train_cv`` reporting each epoch to Tune),
the device it trains on, and where its fold models go (``ModelSink`` on the driver's node)."""

from __future__ import annotations

import errno
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray import tune

from data_pipeline.atomic import remove
from search.common.attrs import TRIAL_EPOCHS
from search.common.ensemble import ensemble_files, model_meta, write_files
from search.training.checkpoint import RESUMED, checkpoint_key
from search.training.checkpoint import SUFFIX as CHECKPOINT_SUFFIX
from search.training.engine import TrainData, TrainParams, precision, train_cv
from search.training.results import CVResult

METRIC = "auc"  # mean held-out AUC over the folds trained so far (all k after epoch 1)


TIME_ATTR = "fold_epochs"  # ASHA's clock: fold-epochs trained (racing makes it != epochs)


@dataclass(frozen=True)
class TrialSettings:
    """What every trial needs besides its params (goes to trials by ``with_parameters``)."""

    max_epochs: int
    seed: int
    threads: int  # torch CPU threads
    pretrained: bool | str
    race_epochs: int = 3  # fold racing: fold 0 alone for this many epochs (0: lockstep)
    models_dir: str | None = None  # COMPLETE trials save their fold models + OOF here
    model_meta: dict | None = None  # saved with them: dataset fingerprint, folds file, ...
    # run_trials sets it: the actor that writes them on the driver's node (see ModelSink)
    sink: Any = None  # the driver-side actor (ray.actor.ActorHandle) that writes fold models
    gpu_share: float = 0.0  # --gpus-per-trial: the share of its GPU a trial plans memory with
    # each trial's resumable state (search.training.checkpoint) on the node it runs on: an
    # interrupted trial's params run again on resume and continue from it
    checkpoint_dir: str | None = None


def split_config(config: dict, settings: TrialSettings) -> tuple[dict, int]:
    """A trial's training params and its schedule length in epochs: a promoted trial's config
    carries its own (``search.tuning.ladder``), every other trial trains the study's."""
    params = {k: v for k, v in config.items() if k != TRIAL_EPOCHS}
    return params, int(config.get(TRIAL_EPOCHS, settings.max_epochs))


def trial_checkpoint(settings: TrialSettings, config: dict, k: int) -> Path | None:
    """Where the trial of ``config`` keeps its resumable state (None: no checkpoints): the
    same params trained the same way on the same data and folds find the same file."""
    if settings.checkpoint_dir is None:
        return None
    params, epochs = split_config(config, settings)
    key = checkpoint_key(
        params,
        seed=settings.seed,
        max_epochs=epochs,
        race_epochs=settings.race_epochs,
        k=k,
        data=settings.model_meta,
    )
    return Path(settings.checkpoint_dir) / f"{key}{CHECKPOINT_SUFFIX}"


@dataclass(frozen=True)
class Resources:
    cpus_per_trial: float
    gpus_per_trial: float
    concurrency: int


def _trainable(config: dict, data: TrainData, folds: np.ndarray, settings: TrialSettings) -> None:
    """One trial: train the k fold models (racing), report the mean fold AUC every step.

    A trial that trains to the end (or stops itself by patience) saves its fold models and
    out-of-fold probabilities before its last report, so the searcher can record where.
    """
    node = ray.get_runtime_context().get_node_id()[:12]
    device = trial_device(ray.get_gpu_ids(), torch.cuda.is_available(), node)
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    arithmetic = precision(device)  # once per trial, not per report
    params, epochs = split_config(config, settings)
    full = epochs * (int(np.max(folds)) + 1)
    keep = settings.models_dir is not None
    last: dict = {}

    def report(epoch: int, m: dict) -> bool:
        result = {
            METRIC: m["auc"],
            "epoch": epoch,
            TIME_ATTR: m["fold_epochs"],
            "folds": m["folds"],
            "auc_folds": m["auc_folds"],
            "val_loss": m["val_loss"],
            "train_loss": m["train_loss"],
            "acc": m["acc"],
            "trial_seconds": m["seconds"],
            "images_per_s": m["train_images_per_s"],
            "device": device_name,
            "precision": arithmetic,
            "self_stopped": bool(m.get("self_stopped", False)),
            "node": node,
            RESUMED: m.get(RESUMED, 0),  # > 0: continued from an interrupted run's checkpoint
        }
        if keep and (m["fold_epochs"] >= full or result["self_stopped"]):
            last.update(result)  # the last report: after the models are saved
        else:
            tune.report(result)
        return False  # stopping is ASHA's call: Ray ends this thread at the next report

    checkpoint = trial_checkpoint(settings, config, int(np.max(folds)) + 1)
    res = train_cv(
        params,
        data,
        folds,
        epochs=epochs,
        device=device,
        seed=settings.seed,
        threads=settings.threads,
        pretrained=settings.pretrained,
        on_epoch=report,
        race_epochs=settings.race_epochs,
        keep_states=keep,
        keep_oof=keep,
        gpu_share=settings.gpu_share or 1.0,
        checkpoint=checkpoint,
    )
    if checkpoint is not None:  # trained to its end: nothing left to resume
        remove(checkpoint)
    if last:
        trial_id = tune.get_context().get_trial_id()
        last["models"] = _save_models(params, epochs, res, settings, trial_id)
        last["pool"] = res.pool + (f" ({res.pool_note})" if res.pool_note else "")
        tune.report(last)


class DiskFullError(OSError):
    """The disk that keeps the fold models (and the study) is full: the search stops."""


class NoCudaError(RuntimeError):
    """Ray gave a trial a GPU, but torch in that worker finds no CUDA device."""


def trial_device(gpu_ids: list, cuda_available: bool, node: str) -> str:
    """The device a trial trains on: "cuda" when Ray gave it a GPU, else "cpu". A GPU given
    where torch sees none (a CPU build of torch, a driver problem, a logical GPU declared
    with ``ray start --num-gpus``) is an error naming the node: silently training on its CPU
    would take the GPU's schedule and make every number wrong."""
    if not gpu_ids:
        return "cpu"
    if cuda_available:
        return "cuda"
    raise NoCudaError(
        f"Ray gave this trial GPU {list(gpu_ids)} on node {node} ({socket.gethostname()}), "
        f"but torch {torch.__version__} there finds no CUDA device (CUDA build: "
        f"{torch.version.cuda or 'none'}, CUDA_VISIBLE_DEVICES="
        f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}); install a CUDA build of torch on "
        "that node, or run with --gpus-per-trial 0"
    )


class ModelSink:
    """Writes the kept fold models under ``models_dir`` on the driver's node (a Ray actor).

    A trial may run on any node of a cluster; its files travel to this actor whole, as bytes
    through Ray's object store, and are written atomically where the driver (and pcam-refit)
    reads them. So the models folder needs no filesystem shared by the nodes: Ray >= 2.7 no
    longer syncs trial folders to the head node (checkpoints need NFS or cloud storage), and
    Optuna's artifact store needs a store every worker can reach (a file store on the driver's
    disk is not). The study database gets only the folder's path.
    """

    def __init__(self, models_dir: str) -> None:
        self.models_dir = Path(models_dir)

    def put(self, trial_id: str, files: dict) -> str:
        """Write one trial's ``{name: bytes}`` as ``models_dir/<trial_id>``; its path."""
        if Path(trial_id).name != trial_id:
            raise ValueError(f"bad trial id {trial_id!r}")
        return str(write_files(self.models_dir / trial_id, files))


def start_sink(models_dir: str) -> Any:
    """A ``ModelSink`` actor pinned to this (the driver's) node, using no CPU."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    actor = ray.remote(num_cpus=0)(ModelSink)
    return actor.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False)
    ).remote(models_dir)


def _save_models(
    params: dict, epochs: int, res: CVResult, settings: TrialSettings, trial_id: str
) -> str:
    """Fold weights + OOF of a finished trial, atomically, in ``models_dir/<ray trial id>`` on
    the driver's node (through ``settings.sink``; written here when there is none)."""
    p = TrainParams.from_dict(params)
    assert res.states is not None  # train_cv(keep_states=True) for a kept trial
    meta = {
        **(settings.model_meta or {}),
        **model_meta(p),
        "epochs": epochs,
        "k": len(res.states),
        "device": res.device,
        "ray_trial_id": trial_id,
    }
    files = ensemble_files(res.states, meta, oof=res.oof_best if p.restore_best else res.oof)
    try:
        if settings.sink is None:
            assert settings.models_dir is not None  # only called when models are kept
            return str(write_files(Path(settings.models_dir) / trial_id, files))
        return ray.get(settings.sink.put.remote(trial_id, files))
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        size = sum(len(b) for b in files.values()) / 1e6
        raise DiskFullError(
            f"no space left on the disk of {settings.models_dir} to keep a trial's fold models "
            f"({size:.1f} MB); free space there (or --keep-top 0: keep none) and run the same "
            "command again"
        ) from None


def noop_trainable(
    config: dict, data: TrainData, folds: np.ndarray, settings: TrialSettings
) -> None:
    """No training: reports ``max_epochs`` made-up AUCs (a smooth function of lr) at once.

    For measuring orchestration overhead per trial (``benchmarks/search_overhead.py``).
    """
    base = 0.9 - 0.05 * abs(math.log10(float(config.get("lr", 1e-3))) + 3)
    k = int(np.max(folds)) + 1
    for epoch in range(1, split_config(config, settings)[1] + 1):
        tune.report(
            {
                METRIC: base + 0.01 * epoch,
                "epoch": epoch,
                TIME_ATTR: epoch * k,
                "folds": k,
                "auc_folds": [base] * k,
            }
        )
