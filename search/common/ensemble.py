"""A saved fold ensemble: one safetensors file per fold + ``ensemble.json``, and TTA prediction.

The JSON holds everything needed to rebuild and use the models without the study: arch,
training params, normalisation, crop, folds file, data fingerprint, package version and the
SHA-256 of every weights file (a modified file is refused). Weights are safetensors: loading
them never unpickles anything.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save

import models
from data_pipeline.atomic import atomic_path
from search.training.batches import crop_batch, normalise, to_unit
from search.training.engine import PoolImages, TrainParams
from search.training.fold import create_model, probabilities, resolve_device
from search.training.metrics import blend

TTA_CHOICES = (1, 4, 8)


META_FILE = "ensemble.json"  # an ensemble folder's description: params, norm, file hashes


def model_meta(p: TrainParams, model: torch.nn.Module | None = None) -> dict:
    """What loading a fold model needs, as ``ensemble.json`` keeps it: the arch, the params,
    the normalisation the model's inputs get, the crop. The one builder of it."""
    norm = models.data_config(model if model is not None else create_model(p), p.arch)
    return {
        "arch": p.arch,
        "params": asdict(p),
        "norm": {"mean": list(norm["mean"]), "std": list(norm["std"])},
        "crop": p.crop,
    }


class EnsembleError(ValueError):
    """An ensemble folder is incomplete, tampered with or inconsistent."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dihedral_views(x: torch.Tensor, n: int) -> list[torch.Tensor]:
    """The first ``n`` of the 8 dihedral transforms of (B, C, H, W) square patches.

    1: identity; 4: the four 90-degree rotations; 8: rotations and their mirror images.
    Tissue has no orientation, so every view has the same label.
    """
    if n not in TTA_CHOICES:
        raise ValueError(f"tta must be one of {TTA_CHOICES}, got {n}")
    rots = [torch.rot90(x, k, dims=(-2, -1)) for k in range(4 if n >= 4 else 1)]
    return rots + [r.flip(-1) for r in rots] if n == 8 else rots


@dataclass
class Ensemble:
    """Fold models (eval mode, on ``device``) and the metadata they were saved with."""

    models: list[torch.nn.Module]
    meta: dict
    device: torch.device

    @property
    def params(self) -> TrainParams:
        return TrainParams.from_dict(self.meta["params"])

    @classmethod
    def from_states(
        cls, states: list[dict], params: dict | TrainParams, device: str | torch.device = "cpu"
    ) -> Ensemble:
        """Fold models from in-memory state_dicts (``train_cv(keep_states=True)``,
        ``train_full``) with the normalisation ``params``' model asks for; nothing saved."""
        p = params if isinstance(params, TrainParams) else TrainParams.from_dict(params)
        dev = resolve_device(device)
        ms = []
        for sd in states:
            m = create_model(p)
            m.load_state_dict(sd, strict=True)
            ms.append(m.to(dev).to(memory_format=torch.channels_last).eval())
        return cls(ms, model_meta(p, ms[0]), dev)

    @torch.no_grad()
    def predict(
        self,
        images: np.ndarray | PoolImages,
        tta: int = 8,
        batch: int = 512,
        progress: Callable[[int], object] | None = None,
        per_model: bool = False,
    ) -> np.ndarray:
        """Mean probability over fold models and ``tta`` dihedral views: (N, 96, 96, 3) uint8
        -> (N,) float32 in [0, 1]; with ``per_model`` each fold model's own mean over the
        views, (M, N). ``progress(n_done)`` is called after each batch."""
        p = self.params
        x = images  # (N, 96, 96, 3) uint8, an array or PoolImages: cropped batch by batch
        mean = torch.tensor(self.meta["norm"]["mean"], device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.meta["norm"]["std"], device=self.device).view(1, 3, 1, 1)
        cuda = self.device.type == "cuda"
        out = np.empty((len(self.models), len(x)), np.float32)  # (M, N)
        for s in range(0, len(x), batch):
            xb = crop_batch(x[s : s + batch], p.crop).to(self.device, non_blocking=cuda)
            xb = to_unit(xb)  # (B, 3, c, c) in [0, 1]
            views = [normalise(v, mean, std) for v in dihedral_views(xb, tta)]
            for i, m in enumerate(self.models):
                acc = probabilities(m, views[0])
                for v in views[1:]:
                    acc = acc + probabilities(m, v)
                out[i, s : s + len(xb)] = (acc / len(views)).cpu().numpy()
            if progress is not None:
                progress(len(xb))
        return out if per_model else out.mean(0)

    def predict_held_out(
        self, images: np.ndarray | PoolImages, folds: np.ndarray, tta: int
    ) -> np.ndarray:
        """Out-of-fold probabilities over ``tta`` views: row i from fold model ``folds[i]``
        only, the one that never trained on it. ``images``: the labelled pool in fold-file
        order ((N, 96, 96, 3) uint8, an array or memory-mapped); -> (N,) float32. With the
        test's ``tta`` this is the OOF a selection should use: it scores the predictor that
        predicts the test set (one view, as training scored it, is a weaker one)."""
        folds = np.asarray(folds)
        if len(folds) != len(images) or folds.max() + 1 != len(self.models):
            raise EnsembleError(
                f"{len(self.models)} fold models cannot score {len(images)} rows of "
                f"{folds.max() + 1} folds"
            )
        out = np.empty(len(images), np.float32)
        for f, model in enumerate(self.models):
            idx = np.flatnonzero(folds == f)
            own = Ensemble([model], self.meta, self.device)
            rows = (
                PoolImages(images.path, images.rows[idx])
                if isinstance(images, PoolImages)
                else images[idx]
            )
            out[idx] = own.predict(rows, tta=tta)
        return out


OOF_FILE = "oof.safetensors"  # out-of-fold probabilities saved beside the fold weights


def ensemble_files(states: list[dict], meta: dict, oof: np.ndarray | None = None) -> dict:
    """The files of a fold ensemble, in memory: ``{name: bytes}`` (fold weights as
    safetensors, ``oof.safetensors``, ``ensemble.json`` with their hashes), so they can be
    written here or sent to another node whole (``write_files``).

    ``meta`` needs ``params`` (TrainParams dict) and ``norm``; file names, hashes and the
    package version are added. ``oof``: (N,) held-out probabilities of the labelled pool in
    fold-file order.
    """
    files: dict[str, bytes] = {}
    folds = []
    for f, sd in enumerate(states):
        name = f"fold{f}.safetensors"
        files[name] = save({k: v.contiguous() for k, v in sd.items()})
        folds.append({"file": name, "sha256": hashlib.sha256(files[name]).hexdigest()})
    meta = {**meta, "folds": folds, "version": importlib.metadata.version("pcam-search")}
    if oof is not None:
        files[OOF_FILE] = save({"prob": torch.from_numpy(np.asarray(oof, np.float32))})
        meta["oof"] = {"file": OOF_FILE, "sha256": hashlib.sha256(files[OOF_FILE]).hexdigest()}
    files[META_FILE] = json.dumps(meta, indent=2, default=str).encode()
    return files


def write_files(folder: Path, files: dict) -> Path:
    """Write ``{name: bytes}`` as ``folder`` atomically: a temp folder, then a rename; an
    existing folder is replaced only after the new one is whole, so a killed writer leaves
    no half-written ensemble that loads."""
    folder = Path(folder)
    for name in files:
        if Path(name).name != name:  # only plain names: nothing lands outside the folder
            raise EnsembleError(f"refusing to write {name!r} into {folder}")
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        for name, data in files.items():
            (tmp / name).write_bytes(data)
    return folder


def save_ensemble(
    folder: Path, states: list[dict], meta: dict, oof: np.ndarray | None = None
) -> Path:
    """Write fold weights + ``ensemble.json`` (+ ``oof.safetensors``) into ``folder``
    atomically: ``ensemble_files`` then ``write_files``."""
    return write_files(folder, ensemble_files(states, meta, oof))


def load_oof(folder: Path) -> np.ndarray | None:
    """The out-of-fold probabilities saved with an ensemble (None if it has none); a modified
    file is an ``EnsembleError``."""
    folder = Path(folder)
    meta = json.loads((folder / META_FILE).read_text())
    entry = meta.get("oof")
    if not entry:
        return None
    path = folder / entry["file"]
    if not path.is_file() or _sha256(path) != entry["sha256"]:
        raise EnsembleError(f"{path}: missing or differs from the hash saved with the ensemble")
    return load_file(str(path))["prob"].numpy()


MEMBERS = "members"  # ensemble.json key of a multi-trial ensemble


@dataclass
class WeightedEnsemble:
    """Several trials' fold ensembles, each with its own arch, crop and normalisation, and
    their weights (greedy selection's; they sum to 1)."""

    members: list[Ensemble]
    weights: list[float]
    meta: dict

    def predict(
        self,
        images: np.ndarray | PoolImages,
        tta: int = 8,
        batch: int = 512,
        progress: Callable[[int], object] | None = None,
        per_model: bool = False,
    ) -> np.ndarray:
        """Weighted mean of the members' TTA fold-ensemble probabilities, (N,); with
        ``per_model`` each member's own, (M, N)."""
        share = None if progress is None else (lambda n: progress(n / len(self.members)))
        out = np.stack([m.predict(images, tta, batch, share) for m in self.members])
        return out if per_model else blend(out, self.weights)


def save_members(folder: Path, members: list[tuple[Path, float, dict]], meta: dict) -> Path:
    """Write a multi-trial ensemble into ``folder`` atomically: each member's fold ensemble
    folder is copied into ``member-<i>/``, and ``ensemble.json`` lists them with their weights
    (``members``: (source folder, weight, info) triples) and the hash of each member's own
    ``ensemble.json``."""
    import shutil

    folder = Path(folder)
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        entries = []
        for i, (src, weight, info) in enumerate(members):
            name = f"member-{i}"
            shutil.copytree(src, tmp / name)
            sha = _sha256(tmp / name / META_FILE)
            entries.append({**info, "dir": name, "weight": weight, "sha256": sha})
        meta = {**meta, MEMBERS: entries, "version": importlib.metadata.version("pcam-search")}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return folder


def _inside(folder: Path, name: str) -> Path:
    """``folder / name``, refused when it points outside ``folder`` (absolute, ``..``, link)."""
    path = (folder / name).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise EnsembleError(f"{folder / 'ensemble.json'}: entry {name!r} points outside {folder}")
    return path


def _read_meta(folder: Path) -> dict:
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise EnsembleError(f"{folder}: no ensemble.json (not an ensemble folder)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EnsembleError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not (MEMBERS in meta or {"params", "folds"} <= set(meta)):
        raise EnsembleError(f"{meta_path}: neither a fold ensemble nor a multi-trial one")
    problem = _members_problem(meta) if MEMBERS in meta else _folds_problem(meta)
    if problem:
        raise EnsembleError(f"{meta_path}: {problem}")
    return meta


def _entries_problem(entries: object, key: str, what: str) -> str:
    """Why a list of ``{key: name, "sha256": hex}`` entries is malformed ("" if it is not)."""
    if not isinstance(entries, list) or not entries:
        return f"{what} must be a non-empty list, got {entries!r:.80}"
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get(key), str) or not e[key]:
            return f"{what}[{i}] has no {key!r}"
        if not isinstance(e.get("sha256"), str) or len(e["sha256"]) != 64:
            return f"{what}[{i}] ({e[key]}) has no sha256"
    return ""


def _folds_problem(meta: dict) -> str:
    """Why a fold ensemble's ``ensemble.json`` is malformed ("" if it is not)."""
    if not isinstance(meta["params"], dict):
        return "'params' must be a table of the trial's params"
    norm = meta.get("norm")
    if not isinstance(norm, dict) or not all(
        isinstance(norm.get(k), list) and len(norm[k]) == 3 for k in ("mean", "std")
    ):
        return "'norm' must hold the 3-channel 'mean' and 'std' the models were trained with"
    return _entries_problem(meta["folds"], "file", "'folds'")


def _members_problem(meta: dict) -> str:
    """Why a multi-trial ensemble's ``ensemble.json`` is malformed ("" if it is not)."""
    problem = _entries_problem(meta[MEMBERS], "dir", f"{MEMBERS!r}")
    if problem:
        return problem
    for i, e in enumerate(meta[MEMBERS]):
        if not isinstance(e.get("weight"), int | float) or isinstance(e["weight"], bool):
            return f"{MEMBERS!r}[{i}] ({e['dir']}) has no numeric 'weight'"
    return ""


def load_ensemble(
    folder: Path, device: str | torch.device | None = None
) -> Ensemble | WeightedEnsemble:
    """Rebuild the fold models from ``folder`` (or every member's, for a multi-trial ensemble);
    a missing, modified or non-safetensors weights file, a corrupt ``ensemble.json`` or an
    entry outside the folder is an ``EnsembleError`` naming it."""
    folder = Path(folder)
    meta = _read_meta(folder)
    if MEMBERS in meta:
        return _load_members(folder, meta, device)
    return _load_folds(folder, meta, device)


def _load_folds(folder: Path, meta: dict, device: str | torch.device | None) -> Ensemble:
    """The fold models of one trial's ``folder`` (its ``ensemble.json`` read as ``meta``)."""
    dev = resolve_device(device)
    try:
        p = TrainParams.from_dict(meta["params"])
    except (TypeError, ValueError) as e:
        raise EnsembleError(f"{folder / 'ensemble.json'}: bad params ({e})") from None
    fold_models = []
    for entry in meta["folds"]:
        path = _inside(folder, entry["file"])
        if not path.is_file():
            raise EnsembleError(f"{path}: weights file missing")
        if _sha256(path) != entry["sha256"]:
            raise EnsembleError(f"{path}: contents differ from the hash saved with the ensemble")
        try:
            sd = load_file(str(path))
        except Exception as e:
            raise EnsembleError(f"{path}: not a valid safetensors file ({e})") from None
        m = create_model(p)
        try:
            m.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise EnsembleError(f"{path}: does not fit {p.arch}: {e}") from None
        fold_models.append(m.to(dev).to(memory_format=torch.channels_last).eval())
    return Ensemble(fold_models, meta, dev)


def _load_members(folder: Path, meta: dict, device: str | torch.device | None) -> WeightedEnsemble:
    members, weights = [], []
    for entry in meta[MEMBERS]:
        sub = _inside(folder, entry["dir"])
        if not (sub / META_FILE).is_file() or _sha256(sub / META_FILE) != entry["sha256"]:
            raise EnsembleError(f"{sub}: missing or differs from the hash saved with the ensemble")
        sub_meta = _read_meta(sub)
        if MEMBERS in sub_meta:
            raise EnsembleError(f"{sub}: a member may not itself be a multi-trial ensemble")
        members.append(_load_folds(sub, sub_meta, device))
        weights.append(float(entry["weight"]))
    if not members or min(weights) <= 0 or abs(sum(weights) - 1) > 1e-6:
        raise EnsembleError(
            f"{folder / 'ensemble.json'}: member weights {weights} must be > 0 and sum to 1"
        )
    return WeightedEnsemble(members, weights, meta)
