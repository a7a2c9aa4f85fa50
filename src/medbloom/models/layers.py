"""Building blocks shared by the models.

Dimension-agnostic layer factories (the same model code builds 2D and 3D nets), the
ImageNet input scaling for pretrained weights, and :class:`Backbone`, which knows its
head and first convolution, for freezing and for loading ImageNet weights.
"""

from __future__ import annotations

from typing import Self

import torch
from torch import nn


def conv(dims: int, *args: object, **kwargs: object) -> nn.Module:
    return (nn.Conv3d if dims == 3 else nn.Conv2d)(*args, **kwargs)  # type: ignore[arg-type]


def max_pool(dims: int, kernel: int) -> nn.Module:
    return nn.MaxPool3d(kernel) if dims == 3 else nn.MaxPool2d(kernel)


def global_pool(dims: int) -> nn.Module:
    return nn.AdaptiveAvgPool3d(1) if dims == 3 else nn.AdaptiveAvgPool2d(1)


def norm(kind: str, dims: int, channels: int) -> nn.Module:
    """A normalisation layer.

    ``group`` (GroupNorm) keeps no running statistics, so it behaves the same on
    every client whatever its label mix: the safe choice for non-IID federations.
    ``batch`` is BatchNorm, needed to load ImageNet weights.
    """
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "batch":
        return nn.BatchNorm3d(channels) if dims == 3 else nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}: expected group, batch or none")


# torchvision's ImageNet normalisation, which its checkpoints were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageNetInput(nn.Module):
    """Maps medbloom's inputs (pixels scaled to [-1, 1]) to ImageNet's input scale.

    ImageNet weights expect ``(p - mean) / std`` of pixels ``p`` in [0, 1]; feeding them
    [-1, 1] instead would shrink every first-layer response about 2.2 times. For one
    channel the mean and std of the three are used, to match the summed RGB kernels of
    the first convolution.

    The constants are buffers in the state dict (``input_norm.mean``, ``input_norm.std``)
    on purpose: weights of a model with this scaling then do not load into one without
    it (a client or evaluation that forgot ``pretrained``); the error is loud instead of
    a model that silently computes something else.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        mean = IMAGENET_MEAN if channels == 3 else (sum(IMAGENET_MEAN) / 3,) * channels
        std = IMAGENET_STD if channels == 3 else (sum(IMAGENET_STD) / 3,) * channels
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x + 1.0) * 0.5 - self.mean) / self.std


class Backbone(nn.Module):
    """A classifier whose parameters split into features and a head.

    ``head`` names the head's parameter prefixes: the layers that ``freeze_features``
    leaves trainable and that are not taken from an ImageNet checkpoint (their shape
    depends on the data set's classes). ``first_conv`` names the weight whose input
    channels follow the data set's.
    """

    head: tuple[str, ...] = ("fc.",)
    first_conv: str = "conv1.weight"

    def freeze_features(self) -> None:
        """Train only the head; frozen BatchNorm layers keep their running statistics.

        A frozen layer must compute the same function in every round and on every client,
        so BatchNorm layers without a trainable parameter stay in eval mode even while
        the model trains (see :meth:`train`): they normalise with their stored statistics
        and never update them.
        """
        for name, param in self.named_parameters():
            param.requires_grad = name.startswith(self.head)
        self.train(self.training)

    def train(self, mode: bool = True) -> Self:
        super().train(mode)
        if mode:
            for m in self.modules():
                if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
                    params = list(m.parameters(recurse=False))
                    if params and not any(p.requires_grad for p in params):
                        m.eval()
        return self
