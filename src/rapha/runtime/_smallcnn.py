"""``rapha.SmallCNN``: a tiny GroupNorm CNN that Opacus DP-SGD can train.

Kept apart from :mod:`rapha.runtime.zoo` so that the catalogue can be read (by the hub, by
manifest validation) without importing torch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["SmallCNN"]

_GROUPS = 8


class SmallCNN(nn.Module):
    """Four blocks of conv3x3 → GroupNorm → ReLU → max-pool, global average pool, linear.

    Channels grow ``width, 2*width, 4*width, 8*width``. GroupNorm (never BatchNorm) keeps
    samples independent, which per-sample gradients (DP-SGD) require. Pooling uses
    ``ceil_mode`` so inputs down to 8x8 still work. ``forward`` returns logits of shape
    ``(batch, num_classes)``.
    """

    def __init__(
        self, *, in_channels: int, num_classes: int, width: int = 32, dropout: float = 0.0
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for factor in (1, 2, 4, 8):
            c_out = width * factor
            layers += [
                nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
                nn.GroupNorm(math.gcd(_GROUPS, c_out), c_out),
                nn.ReLU(),  # not in place: Opacus hooks the module outputs
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, num_classes)`` for images ``(batch, in_channels, H, W)``."""
        h = self.pool(self.features(x)).flatten(1)
        out: torch.Tensor = self.head(self.dropout(h))
        return out
