"""Augmentation on whole batch tensors (on the GPU when there is one), never per image in Python.

- Dihedral: each patch gets one of the 8 flips/90-degree rotations. Composing three independent
  coin flips (horizontal flip, vertical flip, transpose) yields exactly the dihedral group of a
  square, so every one of the 8 is equally likely. Tissue has no orientation: label-preserving.
- Stain jitter (HED): RGB -> optical density -> haematoxylin/eosin/DAB concentrations (Ruifrok &
  Johnston matrix, as skimage.color.rgb2hed), each scaled and shifted per patch, and back. This
  mimics lab-to-lab stain variation, the main domain shift in PCam.
"""

from __future__ import annotations

import torch

# rgb_from_hed rows: optical density of H, E, DAB per RGB channel (skimage.color).
_RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float32
)
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_EPS = 1e-6


def dihedral(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, C, H, W) with H == W -> same shape, each patch under a random one of 8 symmetries."""
    b = x.shape[0]
    for op in (lambda t: t.flip(-1), lambda t: t.flip(-2), lambda t: t.transpose(-1, -2)):
        m = torch.rand(b, generator=generator, device="cpu").to(x.device) < 0.5
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
    m_in, m_out = _HED_FROM_RGB.to(x.device, x.dtype), _RGB_FROM_HED.to(x.device, x.dtype)
    od = -torch.log(x.clamp_min(_EPS))  # optical density, (B, 3, H, W)
    hed = torch.einsum("bchw,cd->bdhw", od, m_in)
    noise = torch.randn(2, b, 3, generator=generator, device="cpu").to(x.device, x.dtype)
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


def mixup(
    x: torch.Tensor, y: torch.Tensor, alpha: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp: x' = lam*x + (1-lam)*x[perm], same for the targets; one lam ~ Beta(alpha, alpha)
    per batch. alpha -> 0 gives lam in {0, 1} almost surely (no mixing within a pair)."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample()) if alpha > 0 else 1.0
    lam = max(lam, 1 - lam)  # the first image dominates: same mixes, kept near the original
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]


def centre_fraction(box: tuple[int, int, int, int], size: int, centre: int = CENTRE) -> float:
    """Fraction of the centre ``centre`` x ``centre`` square of a ``size`` patch that the box
    (y0, y1, x0, x1), half-open, covers."""
    c0 = (size - min(centre, size)) // 2
    c1 = c0 + min(centre, size)
    y0, y1, x0, x1 = box
    h = max(0, min(y1, c1) - max(y0, c0))
    w = max(0, min(x1, c1) - max(x0, c0))
    return h * w / float((c1 - c0) ** 2)


def cutmix(
    x: torch.Tensor, y: torch.Tensor, alpha: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix with PCam's centre rule: a box of x[perm] is pasted into x, and the target moves
    toward y[perm] only by the share of the **centre 32x32** the box covers:
    y' = (1 - c)*y + c*y[perm]. A box pasted in the outer ring (c = 0) leaves the label alone:
    tumour there does not make a tumour patch. Box area ~ 1 - Beta(alpha, alpha), as in the
    CutMix paper; one box per batch. x: (B, C, S, S)."""
    s = x.shape[-1]
    lam = float(torch.distributions.Beta(alpha, alpha).sample()) if alpha > 0 else 1.0
    cut = (1 - lam) ** 0.5
    h = w = int(round(s * cut))
    if h == 0:
        return x, y
    cy, cx = (int(v) for v in torch.randint(0, s, (2,), generator=generator))
    y0, y1 = max(cy - h // 2, 0), min(cy - h // 2 + h, s)
    x0, x1 = max(cx - w // 2, 0), min(cx - w // 2 + w, s)
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    out = x.clone()
    out[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    c = centre_fraction((y0, y1, x0, x1), s)
    return out, (1 - c) * y + c * y[perm]
