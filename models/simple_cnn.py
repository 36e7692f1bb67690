"""The small CNN Kaggle notebooks start from: a few conv-BN-ReLU-pool blocks and a 1-logit head."""

from __future__ import annotations

import torch
from torch import nn

# Input normalisation for simple_cnn (RGB, after scaling to [0, 1]): approximate per-channel
# mean/std of PCam patches (pink-purple H&E: high red and blue, lower green). Not critical -
# BatchNorm follows the first conv - but keeps inputs near zero mean, unit scale.
MEAN = (0.70, 0.54, 0.69)
STD = (0.24, 0.28, 0.21)


class SimpleCNN(nn.Module):
    """``depth`` blocks of (conv3x3-BN-ReLU) x2 + maxpool, channels ``width * 2**i``; global
    average pool, dropout, linear -> 1 logit. Works for any crop >= 2**depth px."""

    def __init__(self, width: int = 16, depth: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i in range(depth):
            c_out = width * 2**i
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(c_in, 1)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, 3, H, W) float -> (B, 1) logits
        return self.fc(self.drop(self.pool(self.features(x)).flatten(1)))
