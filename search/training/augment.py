"""Augmentation on whole batch tensors (on the GPU when there is one), never per image in Python.

- Dihedral: each patch gets one of the 8 flips/90-degree rotations. Composing three independent
  coin flips (horizontal flip, vertical flip, transpose) yields exactly the dihedral group of a
  square, so every one of the 8 is equally likely. Tissue has no orientation: label-preserving.
- Stain jitter (HED): RGB -> optical density -> haematoxylin/eosin/DAB concentrations (Ruifrok &
  Johnston matrix, as skimage.color.rgb2hed), each scaled and shifted per patch, and back. This
  mimics lab-to-lab stain variation, the main domain shift in PCam.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from scipy.special import betaincinv

# rgb_from_hed rows: optical density of H, E, DAB per RGB channel (skimage.color).
_RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float32
)
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_EPS = 1e-6


@functools.cache
def _hed_matrices(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(HED <- RGB, RGB <- HED) on ``device``: copied there once per process, not per batch."""
    return _HED_FROM_RGB.to(device, dtype), _RGB_FROM_HED.to(device, dtype)


def dihedral(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, C, H, W) with H == W -> same shape, each patch under a random one of 8 symmetries.
    The coin flips are drawn where ``x`` lives (``generator``: one on that device, or the
    default one)."""
    b = x.shape[0]
    coins = torch.rand(3, b, generator=generator, device=x.device) < 0.5  # (3, B)
    ops = (lambda t: t.flip(-1), lambda t: t.flip(-2), lambda t: t.transpose(-1, -2))
    for m, op in zip(coins, ops, strict=True):
        x = torch.where(m.view(b, 1, 1, 1), op(x), x)
    return x


def hed_jitter(
    x: torch.Tensor, strength: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> same, with per-patch stain scale ~ N(1, 0.05*strength) and
    shift ~ N(0, 0.01*strength) per H/E/D channel (strength 1 = a typical HED-light setting)."""
    if strength <= 0:
        return x
    b = x.shape[0]
    m_in, m_out = _hed_matrices(x.device, x.dtype)
    od = -torch.log(x.clamp_min(_EPS))  # optical density, (B, 3, H, W)
    hed = torch.einsum("bchw,cd->bdhw", od, m_in)
    noise = torch.randn(2, b, 3, generator=generator, device=x.device, dtype=x.dtype)
    scale = 1 + 0.05 * strength * noise[0]
    shift = 0.01 * strength * noise[1]
    hed = hed * scale.view(b, 3, 1, 1) + shift.view(b, 3, 1, 1)
    od = torch.einsum("bdhw,dc->bchw", hed, m_out)
    return torch.exp(-od).clamp(0, 1)


def augment(
    x: torch.Tensor, strength: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Training augmentation: dihedral always (when strength > 0), HED jitter scaled by
    ``strength`` in [0, 1] (0 = no augmentation at all). x: (B, 3, H, W) float in [0, 1]."""
    if strength <= 0:
        return x
    return hed_jitter(dihedral(x, generator), strength, generator)


CENTRE = 32  # px: PCam's label is about the centre 32x32 of the patch


@dataclass(frozen=True)
class Mix:
    """One batch's mixing, drawn on the host: the kind, the weight of the batch's own images
    ``lam`` and, for CutMix, the box centre (cy, cx) in px."""

    kind: str  # "mixup" | "cutmix"
    lam: float
    centre: tuple[int, int] = (0, 0)


def beta_quantile(alpha: float, u: float) -> float:
    """The ``u``-quantile of Beta(alpha, alpha): a Beta draw from a uniform one, so the
    caller's generator is its only source (``torch.distributions.Beta`` takes none and
    would draw from the global stream). alpha <= 0: 1 (no mixing)."""
    return float(betaincinv(alpha, alpha, u)) if alpha > 0 else 1.0


def draw_mixes(
    kind: str,
    prob: float,
    alpha: float,
    steps: int,
    size: int,
    generator: torch.Generator | None = None,
) -> list[Mix | None]:
    """An epoch's mixing choices, one per step (None: that batch is not mixed), drawn on the
    host in three draws, so no step reads a random value back from a device."""
    if kind == "none":
        return [None] * steps
    mixed = (torch.rand(steps, generator=generator) < prob).tolist()
    lams = [beta_quantile(alpha, u) for u in torch.rand(steps, generator=generator).tolist()]
    centres = torch.randint(0, size, (steps, 2), generator=generator).tolist()
    return [
        Mix(kind, lam, (cy, cx)) if m else None
        for m, lam, (cy, cx) in zip(mixed, lams, centres, strict=True)
    ]


def apply_mix(
    x: torch.Tensor, y: torch.Tensor, mix: Mix, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mix`` applied to a batch; the pairing permutation is drawn where ``x`` lives."""
    perm = torch.randperm(x.shape[0], generator=generator, device=x.device)
    if mix.kind == "mixup":
        return mixup_with(x, y, mix.lam, perm)
    return cutmix_with(x, y, mix.lam, mix.centre, perm)


def mixup_with(
    x: torch.Tensor, y: torch.Tensor, lam: float, perm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp: x' = lam*x + (1-lam)*x[perm], same for the targets, with lam >= 1/2 (the first
    image dominates: same mixes, kept near the original)."""
    lam = max(lam, 1 - lam)
    return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]


def mixup(
    x: torch.Tensor, y: torch.Tensor, alpha: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp with one lam ~ Beta(alpha, alpha) per batch, all draws from ``generator`` (a CPU
    one, or the default). alpha -> 0 gives lam in {0, 1} almost surely (no mixing)."""
    lam = beta_quantile(alpha, float(torch.rand((), generator=generator)))
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    return mixup_with(x, y, lam, perm)


def centre_fraction(box: tuple[int, int, int, int], size: int, centre: int = CENTRE) -> float:
    """Fraction of the centre ``centre`` x ``centre`` square of a ``size`` patch that the box
    (y0, y1, x0, x1), half-open, covers."""
    c0 = (size - min(centre, size)) // 2
    c1 = c0 + min(centre, size)
    y0, y1, x0, x1 = box
    h = max(0, min(y1, c1) - max(y0, c0))
    w = max(0, min(x1, c1) - max(x0, c0))
    return h * w / float((c1 - c0) ** 2)


def cutmix_with(
    x: torch.Tensor, y: torch.Tensor, lam: float, centre: tuple[int, int], perm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix with PCam's centre rule: a box of x[perm] (side ``sqrt(1 - lam)`` of the patch,
    centred at ``centre``, clipped) is pasted into x, and the target moves toward y[perm]
    only by the share of the **centre 32x32** the box covers: y' = (1 - c)*y + c*y[perm]. A
    box pasted in the outer ring (c = 0) leaves the label alone: tumour there does not make
    a tumour patch. x: (B, C, S, S)."""
    s = x.shape[-1]
    h = w = int(round(s * (1 - lam) ** 0.5))
    if h == 0:
        return x, y
    cy, cx = centre
    y0, y1 = max(cy - h // 2, 0), min(cy - h // 2 + h, s)
    x0, x1 = max(cx - w // 2, 0), min(cx - w // 2 + w, s)
    out = x.clone()
    out[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    c = centre_fraction((y0, y1, x0, x1), s)
    return out, (1 - c) * y + c * y[perm]


def cutmix(
    x: torch.Tensor, y: torch.Tensor, alpha: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix (``cutmix_with``) with box area ~ 1 - Beta(alpha, alpha), as in the CutMix
    paper, one box per batch; all draws from ``generator`` (a CPU one, or the default)."""
    lam = beta_quantile(alpha, float(torch.rand((), generator=generator)))
    cy, cx = (int(v) for v in torch.randint(0, x.shape[-1], (2,), generator=generator))
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    return cutmix_with(x, y, lam, (cy, cx), perm)
