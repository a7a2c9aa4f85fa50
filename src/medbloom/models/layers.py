"""Dimension-agnostic layer factories: the same model code builds 2D and 3D nets."""

from __future__ import annotations

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
