"""VGG-16 in plain PyTorch, with torchvision's layout and parameter names.

The layout is torchvision's ``vgg16`` (configuration D, no BatchNorm), whose
IMAGENET1K_V1 checkpoint loads into it: ``features.N`` are the 13 convolutions (with
ReLU and max-pool modules in between, so the indices match), ``classifier.0``,
``classifier.3`` and ``classifier.6`` the three linear layers. An adaptive average pool
to 7x7 sits between them, so any input size gives the 25088 features ``classifier.0``
expects. VGG-16 is 2D only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medbloom.models.layers import Backbone, ImageNetInput

# Output channels of each 3x3 convolution; "M" is a 2x2 max-pool (torchvision's "D").
VGG16_LAYOUT: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip

# Five 2x2 max-pools halve the input five times: below 32 px a side shrinks to zero.
MIN_INPUT = 32


class VGG16(Backbone):
    """VGG-16: 13 convolutions, adaptive 7x7 average pooling, three linear layers.

    Inputs smaller than 32 px on a side are resized (bilinear) to 32 px first: five
    max-pools would otherwise reduce them to nothing. At 32 px and more the model is
    exactly torchvision's. The head is ``classifier.6``, the last linear layer.
    """

    head = ("classifier.6.",)
    first_conv = "features.0.weight"

    def __init__(
        self, in_channels: int, num_outputs: int, dropout: float = 0.5, imagenet_input: bool = False
    ) -> None:
        super().__init__()
        # ImageNet weights expect ImageNet-normalised pixels (see ImageNetInput).
        self.input_norm: nn.Module = ImageNetInput(in_channels) if imagenet_input else nn.Identity()
        layers: list[nn.Module] = []
        channels = in_channels
        for v in VGG16_LAYOUT:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                assert isinstance(v, int)
                layers += [nn.Conv2d(channels, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                channels = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            _linear(512 * 7 * 7, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            _linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            _linear(4096, num_outputs),
        )
        # torchvision's initialisation.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_norm(x)
        h, w = x.shape[-2:]
        if h < MIN_INPUT or w < MIN_INPUT:
            size = (max(h, MIN_INPUT), max(w, MIN_INPUT))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def _linear(inp: int, out: int) -> nn.Linear:
    """A linear layer initialised as torchvision's VGG does: N(0, 0.01), zero bias.

    Made on the meta device and then given uninitialised memory (as ``skip_init``
    does), to spare the default initialisation: for the 25088x4096 layer it would cost
    as much again as this one.
    """
    layer = nn.Linear(inp, out, device="meta").to_empty(device="cpu")
    nn.init.normal_(layer.weight, 0.0, 0.01)
    nn.init.zeros_(layer.bias)
    return layer
