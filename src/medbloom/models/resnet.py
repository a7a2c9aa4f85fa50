"""ResNet-10/18/50 in plain PyTorch, 2D or 3D, with torchvision's parameter names.

ResNet-10 (one basic block a stage, registered as ``resnet10`` with a stride-2 3x3
stem, 32-256 channels and GroupNorm) is the compact one, for folder image sets at 64
px and more on a CPU; ResNet-18 and -50 are torchvision's.

With ``small_input`` (the registry's choice for inputs up to 64 px) the stem is a 3x3
convolution with stride 1 and no max-pool, as in the MedMNIST v2 benchmark; otherwise
it is ImageNet's 7x7/2 convolution and max-pool. Parameter names follow torchvision, so
its ImageNet checkpoints load into the 2D model built with ``small_input=False`` and
``imagenet_input=True`` (see :mod:`medbloom.models.pretrained`).
"""

from __future__ import annotations

import torch
from torch import nn

from medbloom.models.layers import Backbone, ImageNetInput, conv, global_pool, norm


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, dims: int, inp: int, out: int, stride: int, norm_kind: str) -> None:
        super().__init__()
        self.conv1 = conv(dims, inp, out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(norm_kind, dims, out)
        self.conv2 = conv(dims, out, out, 3, padding=1, bias=False)
        self.bn2 = norm(norm_kind, dims, out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inp != out:
            self.downsample = nn.Sequential(
                conv(dims, inp, out, 1, stride=stride, bias=False), norm(norm_kind, dims, out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, dims: int, inp: int, width: int, stride: int, norm_kind: str) -> None:
        super().__init__()
        out = width * self.expansion
        self.conv1 = conv(dims, inp, width, 1, bias=False)
        self.bn1 = norm(norm_kind, dims, width)
        self.conv2 = conv(dims, width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm(norm_kind, dims, width)
        self.conv3 = conv(dims, width, out, 1, bias=False)
        self.bn3 = norm(norm_kind, dims, out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inp != out:
            self.downsample = nn.Sequential(
                conv(dims, inp, out, 1, stride=stride, bias=False), norm(norm_kind, dims, out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class ResNet(Backbone):
    head = ("fc.",)
    first_conv = "conv1.weight"

    def __init__(
        self,
        depth: int,
        in_channels: int,
        num_outputs: int,
        dims: int = 2,
        small_input: bool = True,
        norm_kind: str = "batch",
        imagenet_input: bool = False,
        base_width: int = 64,
        stem_stride: int = 1,
        stem_pool: bool = False,
    ) -> None:
        super().__init__()
        # ImageNet weights expect ImageNet-normalised pixels (see ImageNetInput).
        self.input_norm: nn.Module = ImageNetInput(in_channels) if imagenet_input else nn.Identity()
        block: type[BasicBlock] | type[Bottleneck]
        if depth == 10:
            block, layers = BasicBlock, (1, 1, 1, 1)
        elif depth == 18:
            block, layers = BasicBlock, (2, 2, 2, 2)
        elif depth == 50:
            block, layers = Bottleneck, (3, 4, 6, 3)
        else:
            raise ValueError(f"ResNet depth {depth} is not supported: expected 10, 18 or 50")
        w = base_width
        if small_input:
            self.conv1 = conv(dims, in_channels, w, 3, stride=stem_stride, padding=1, bias=False)
        else:
            self.conv1 = conv(dims, in_channels, w, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm(norm_kind, dims, w)
        self.relu = nn.ReLU(inplace=True)
        pool = nn.MaxPool3d if dims == 3 else nn.MaxPool2d
        self.maxpool: nn.Module = (
            pool(3, stride=2, padding=1) if stem_pool or not small_input else nn.Identity()
        )
        inp = w
        stages = []
        for i, n_blocks in enumerate(layers):
            width = w * 2**i
            blocks = []
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(dims, inp, width, stride, norm_kind))
                inp = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = global_pool(dims)
        self.fc = nn.Linear(inp, num_outputs)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.input_norm(x)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))
