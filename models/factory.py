"""``create(arch, ...)``: every model the project trains, as a 1-logit binary classifier.

- ``simple_cnn``: the small CNN Kaggle notebooks start from (``models.simple_cnn``).
- ``resnet18/34/50`` and any other timm name: ``timm.create_model(num_classes=1,
  drop_rate=dropout)`` - timm replaces the head and puts dropout before it.
- ``unfreeze``: how many residual stages, counted from the head, train (0 = head only, ...,
  4 = everything, stem included). Frozen stages also get frozen BatchNorm statistics
  (``timm.layers.freeze_batch_norm_2d``): a frozen stage must not drift with batch statistics.
  For non-ResNet timm models only 0 (head only) and 4 (all) are defined.
- ``pretrained``: False, True (local timm / Hugging Face / torch hub cache only - never the
  network), or a path to a weights file (.safetensors or a torch state_dict). Weights asked for
  and not found raise ``MissingWeightsError`` naming where we looked: never a silent random init.
  ``fetch_weights(arch)`` downloads timm's default weights into those caches (once, on the
  driver: ``pcam-search --pretrained hub``); trials then read them with ``pretrained=True``.
"""

from __future__ import annotations

import difflib
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from timm.layers import freeze_batch_norm_2d
from torch import nn

from models.simple_cnn import MEAN as CNN_MEAN
from models.simple_cnn import STD as CNN_STD
from models.simple_cnn import SimpleCNN

RESNETS = ("resnet18", "resnet34", "resnet50")
STAGES = ("layer4", "layer3", "layer2", "layer1")  # counted from the head
STEM = ("conv1", "bn1")


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights were asked for but no local file has them."""


class UnknownModelError(ValueError):
    """The architecture name is neither ``simple_cnn`` nor a timm model."""


def is_resnet(arch: str) -> bool:
    return arch in RESNETS


def check_name(arch: str) -> None:
    if arch == "simple_cnn" or timm.is_model(arch):
        return
    close = difflib.get_close_matches(arch, ["simple_cnn", *timm.list_models()], n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UnknownModelError(f"unknown architecture {arch!r}{hint} (simple_cnn or a timm name)")


def cached_weights(arch: str) -> list[Path]:
    """Where local copies of timm's default weights for ``arch`` would be (existing or not):
    the Hugging Face hub cache, then the torch hub cache."""
    cfg = timm.models.get_pretrained_cfg(arch)
    candidates: list[Path] = []
    if cfg is None:
        return candidates
    if cfg.hf_hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        repo = Path(constants.HF_HUB_CACHE) / f"models--{cfg.hf_hub_id.replace('/', '--')}"
        for fname in ("model.safetensors", "pytorch_model.bin"):
            try:
                hit = try_to_load_from_cache(cfg.hf_hub_id, fname)
            except Exception:  # malformed cache: treat as absent
                hit = None
            candidates.append(Path(hit) if isinstance(hit, str) else repo / "snapshots/*" / fname)
    if isinstance(cfg.url, str) and cfg.url:
        candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url))
    return candidates


def _download(arch: str) -> Path:
    """Download timm's default weights for ``arch`` into the cache ``cached_weights`` reads
    (the Hugging Face hub cache, else the torch hub cache), as timm itself would."""
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise MissingWeightsError(f"timm has no pretrained weights for {arch!r}")
    if cfg.hf_hub_id:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import EntryNotFoundError

        try:
            return Path(hf_hub_download(cfg.hf_hub_id, "model.safetensors"))
        except EntryNotFoundError:  # older repos hold only the torch file
            return Path(hf_hub_download(cfg.hf_hub_id, "pytorch_model.bin"))
    if not isinstance(cfg.url, str):  # timm's (url, file) pairs: not a plain download
        raise MissingWeightsError(f"timm's weights for {arch!r} are not one URL: {cfg.url!r}")
    dst = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(cfg.url, str(dst), progress=True)
    return dst


def fetch_weights(arch: str, download: Callable[[str], Path] = _download) -> Path:
    """The local file of timm's default (ImageNet) weights for ``arch``: found in the caches,
    or downloaded there now. Call it once, where there is a network (the driver), before any
    worker needs the weights. Offline, ``MissingWeightsError`` names the arch and how to put
    the file in place."""
    check_name(arch)
    if arch == "simple_cnn":
        raise MissingWeightsError("simple_cnn has no pretrained weights; use pretrained=False")
    for p in cached_weights(arch):
        if p.is_file():
            return p
    try:
        path = download(arch)
    except MissingWeightsError:
        raise
    except Exception as e:  # noqa: BLE001 - offline, proxy, hub down: all end the same way
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise MissingWeightsError(
            f"could not download pretrained weights for {arch!r} ({type(e).__name__}: {first}). "
            f'Offline: on a machine with internet run python -c "import timm; '
            f"timm.create_model('{arch}', pretrained=True)\" and copy its Hugging Face cache "
            "(~/.cache/huggingface/hub) to this machine, or give a weights file with "
            "--pretrained PATH"
        ) from e
    if not Path(path).is_file():
        raise MissingWeightsError(f"the download of {arch!r} weights left no file at {path}")
    return Path(path)


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from .safetensors or a torch file, never unpickling arbitrary objects."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        # weights_only refused it (objects other than tensors: nothing was executed) or it is
        # not a torch file at all. torch's own message suggests weights_only=False, which is
        # exactly what must not be done with a file of unknown origin: not passed on.
        refused = "unsupported global" in str(e).lower()  # weights_only met a class or function
        kind = "holds objects other than tensors" if refused else "is not a torch file"
        raise ValueError(f"{path}: not a weights file: it {kind}; refusing to load it") from None
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state_dict, got {type(sd).__name__}")
    return sd


def _load_backbone(model: nn.Module, sd: dict[str, torch.Tensor], source: Path) -> None:
    """Load every tensor except a mismatching classifier (an ImageNet head; a 1-logit head of
    the same shape is loaded too); any other mismatch is an error."""
    own = model.state_dict()
    head = {
        k
        for k in own
        if k.startswith(_classifier_prefix(model))
        and not (k in sd and sd[k].shape == own[k].shape)
    }
    keep = {k: v for k, v in sd.items() if k in own and k not in head}
    missing = [k for k in own if k not in keep and k not in head]
    unexpected = [k for k in sd if k not in own]
    bad_shape = [k for k, v in keep.items() if v.shape != own[k].shape]
    if missing or unexpected or bad_shape:
        raise ValueError(
            f"{source}: weights do not fit this model: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(bad_shape)} wrong shape (e.g. {bad_shape[:3]})"
        )
    model.load_state_dict(keep, strict=False)


def _classifier_prefix(model: nn.Module) -> str:
    head = model.get_classifier()  # type: ignore[operator]  # timm's, typed as nn.Module's
    for name, mod in model.named_modules():
        if mod is head:
            return name + "."
    raise AssertionError("classifier not found")


def _resolve_weights(arch: str, pretrained: bool | str | Path) -> Path | None:
    if pretrained is False or pretrained is None:
        return None
    if pretrained is not True:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise MissingWeightsError(
                f"pretrained weights file {path} does not exist (give a .safetensors or "
                "torch state_dict file of the same architecture)"
            )
        return path
    if arch == "simple_cnn":
        raise MissingWeightsError("simple_cnn has no pretrained weights; use pretrained=False")
    looked = cached_weights(arch)
    for p in looked:
        if p.is_file():
            return p
    raise MissingWeightsError(
        f"pretrained weights for {arch!r} not found locally (no downloads here). Looked for: "
        + "; ".join(str(p) for p in looked)
        + ". Provide them with --pretrained PATH (a .safetensors/.pth file), or populate the "
        "Hugging Face / torch hub cache on a machine with internet and copy it over."
    )


def create(
    arch: str,
    *,
    dropout: float = 0.0,
    unfreeze: int = 4,
    pretrained: bool | str | Path = False,
    width: int = 16,
    depth: int = 4,
) -> nn.Module:
    """A 1-logit classifier: (B, 3, H, W) float -> (B, 1) logits. See the module docstring."""
    check_name(arch)
    if not 0 <= unfreeze <= 4:
        raise ValueError(f"unfreeze must be 0..4 (stages trained from the head), got {unfreeze}")
    weights = _resolve_weights(arch, pretrained)
    if arch == "simple_cnn":
        model: nn.Module = SimpleCNN(width=width, depth=depth, dropout=dropout)
        if weights is not None:  # e.g. a fold model saved by pcam-refit: never ignored
            _load_backbone(model, load_weights_file(weights), weights)
    else:
        model = timm.create_model(arch, pretrained=False, num_classes=1, drop_rate=dropout)
        if weights is not None:
            _load_backbone(model, load_weights_file(weights), weights)
    _freeze(model, arch, unfreeze)
    return model


def _freeze(model: nn.Module, arch: str, unfreeze: int) -> None:
    if unfreeze == 4:
        return
    if is_resnet(arch):
        frozen = [*STEM, *STAGES[unfreeze:]]
    elif unfreeze == 0:
        head = _classifier_prefix(model).rstrip(".")
        frozen = [n for n, _ in model.named_children() if n != head]
    else:
        raise ValueError(f"unfreeze={unfreeze} is defined for ResNets only; {arch} takes 0 or 4")
    for name in frozen:
        sub = getattr(model, name)
        for p in sub.parameters():
            p.requires_grad_(False)
        setattr(model, name, freeze_batch_norm_2d(sub))


def data_config(model: nn.Module, arch: str) -> dict:
    """Input normalisation for ``model``: timm's ``resolve_data_config`` for timm models,
    the documented ``simple_cnn`` constants otherwise. Keys: mean, std (RGB, on [0, 1])."""
    if arch == "simple_cnn":
        return {"mean": CNN_MEAN, "std": CNN_STD}
    cfg = timm.data.resolve_data_config({}, model=model)
    return {"mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}
