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
