"""Data augmentation for local training, on batches of tensors, with Kornia.

``make_augmenter("light", spatial_dims)`` returns a callable that takes a batch of
images as medbloom feeds them to a model (float, pixels scaled to [-1, 1], shape
``(B, C, H, W)`` or ``(B, C, D, H, W)``) and returns a randomly transformed batch of the
same shape, dtype, device and range. It draws its randomness from torch's global
random number generator: the same seed gives the same transforms.

``flip``: each image (or volume) independently flipped left-right (the last axis) with
probability 1/2, nothing else. The folder sets' default (``--augment auto``): brain MRI
is close to symmetric about its midline, and flips double the images a hospital has
without making them harder to learn.

``light``, each image (or volume) independently:

- a left-right flip (the last axis) with probability 1/2; no vertical flips, because
  up and down carry meaning in X-ray, CT, MRI, OCT and ultrasound images;
- a small affine transform: rotation within +-10 degrees (about each axis in 3D),
  translation within +-5 % of the size, scale 0.9 to 1.1. 2D borders are filled by
  reflection (MONAI's default), so no artificial corners appear; Kornia's 3D affine
  fills with black (zeros in [0, 1]);
- brightness and contrast each changed by a factor in [0.9, 1.1] (torchvision's
  formulas: brightness scales the pixels, contrast blends them with the image's mean);
  a volume is treated as one image, so it gets one factor of each and its own mean.

Flips swap left and right: where labels name a side (OrganMNIST's left and right
kidney, lung and femur), pass ``flip=False``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

KINDS = ("none", "flip", "light")


class Augmenter:
    """Kornia transforms on [0, 1] images, applied to batches in [-1, 1]."""

    def __init__(
        self, geometric: nn.Module | None, intensity: nn.Module | None, spatial_dims: int
    ) -> None:
        self.geometric = geometric
        self.intensity = intensity
        self.spatial_dims = spatial_dims

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(
                f"expected a batch of {self.spatial_dims}D images with "
                f"{self.spatial_dims + 2} dimensions, got shape {tuple(x.shape)}"
            )
        if len(x) == 0:
            return x
        with torch.no_grad():
            # Kornia's intensity transforms work on [0, 1], and there zero padding is black.
            out = (x + 1.0).mul_(0.5).clamp_(0.0, 1.0)
            if self.geometric is not None:
                out = self.geometric(out)
            if self.intensity is not None:
                # (B, C, D, H, W) seen as (B, C, D*H, W): one 2D image per volume.
                b, c, w = out.shape[0], out.shape[1], out.shape[-1]
                out = self.intensity(out.reshape(b, c, -1, w)).reshape(out.shape)
            return out.clamp_(0.0, 1.0).mul_(2.0).sub_(1.0).to(dtype=x.dtype)

    def __repr__(self) -> str:
        return f"Augmenter(geometric={self.geometric!r}, intensity={self.intensity!r})"


def make_augmenter(
    kind: str, spatial_dims: int, *, flip: bool = True
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The batch augmentation called ``kind`` for 2D or 3D images; None where it would do
    nothing (``none``, or ``flip`` with ``flip=False``)."""
    if kind not in KINDS:
        raise ValueError(f"augmentation {kind!r} is unknown: expected one of {', '.join(KINDS)}")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, not {spatial_dims}")
    if kind == "none":
        return None
    import kornia.augmentation as K  # imported here: only runs with augmentation need it

    geometric: list[K.AugmentationBase2D | K.AugmentationBase3D] = []
    if kind == "flip":
        if not flip:
            return None  # nothing left to do
        f = K.RandomHorizontalFlip(p=0.5) if spatial_dims == 2 else K.RandomHorizontalFlip3D(p=0.5)
        return Augmenter(K.AugmentationSequential(f), None, spatial_dims)
    if spatial_dims == 2:
        if flip:
            geometric.append(K.RandomHorizontalFlip(p=0.5))
        geometric.append(
            K.RandomAffine(
                degrees=10.0,
                translate=(0.05, 0.05),
                scale=(0.9, 1.1),
                padding_mode="reflection",
                p=1.0,
            )
        )
    else:
        if flip:
            geometric.append(K.RandomHorizontalFlip3D(p=0.5))
        geometric.append(
            K.RandomAffine3D(degrees=10.0, translate=(0.05, 0.05, 0.05), scale=(0.9, 1.1), p=1.0)
        )
    return Augmenter(
        K.AugmentationSequential(*geometric),
        K.ColorJitter(brightness=0.1, contrast=0.1, p=1.0),
        spatial_dims,
    )
