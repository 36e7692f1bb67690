"""Training losses on logits: BCE (optionally class-weighted) and focal loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from search.training.params import LOSSES  # noqa: F401  (defined with the params)


def binary_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    kind: str = "bce",
    gamma: float = 2.0,
    alpha: float = -1.0,
    pos_weight: float | torch.Tensor | None = 1.0,
) -> torch.Tensor:
    """Mean loss over the batch. logits, target: (B,) float; target may be soft (MixUp,
    smoothing). ``pos_weight``: a float, a 0-d tensor on the logits' device, or None
    (1).

    - ``bce``: binary cross-entropy; ``pos_weight`` > 1 weighs positives more (PCam is ~60/40).
    - ``focal`` (Lin et al. 2017): BCE * (1 - p_t)^gamma, times alpha_t when alpha >= 0
      (alpha for positives, 1 - alpha for negatives). gamma = 0 and alpha < 0 is plain BCE.
    """
    pw = pos_weight  # a tensor on the logits' device: the training step builds it once
    if pw is not None and not isinstance(pw, torch.Tensor):
        pw = torch.tensor(pw, device=logits.device) if pw != 1.0 else None
    bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pw, reduction="none")
    if kind == "bce":
        return bce.mean()
    if kind != "focal":
        raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)  # probability given to the (soft) target
    loss = bce * (1 - p_t).clamp_min(0) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * target + (1 - alpha) * (1 - target))
    return loss.mean()
