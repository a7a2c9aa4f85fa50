"""The default model: a small CNN, fast on a CPU, for 2D or 3D images."""

from __future__ import annotations

import torch
from torch import nn

from medbloom.models.layers import Backbone, conv, global_pool, max_pool, norm


class SmallCNN(Backbone):
    """Two conv-conv-pool stages (32 and 64 channels), global average pooling, a linear head.

    Global pooling makes it work at any input size; GroupNorm (the default) keeps no
    running statistics that non-IID clients would pull apart.
    """

    head = ("fc.",)
    first_conv = "features.0.weight"

    def __init__(
        self,
        in_channels: int,
        num_outputs: int,
        dims: int = 2,
        width: int = 32,
        norm_kind: str = "group",
    ) -> None:
        super().__init__()
        w1, w2 = width, 2 * width

        def block(inp: int, out: int) -> list[nn.Module]:
            return [
                conv(dims, inp, out, 3, padding=1, bias=False),
                norm(norm_kind, dims, out),
                nn.ReLU(inplace=True),
            ]

        self.features = nn.Sequential(
            *block(in_channels, w1),
            *block(w1, w1),
            max_pool(dims, 2),
            *block(w1, w2),
            *block(w2, w2),
            max_pool(dims, 2),
            global_pool(dims),
            nn.Flatten(),
        )
        self.fc = nn.Linear(w2, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))
