"""Plain values that cross from the data code to everything else."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

TASKS = ("binary-class", "multi-class", "ordinal-regression", "multi-label, binary-class")


@dataclass(frozen=True)
class ImageSet:
    """One split of a data set.

    ``images`` are uint8, channels first: ``(N, C, H, W)`` for 2D and
    ``(N, C, D, H, W)`` for 3D. ``labels`` are int64 ``(N,)`` class indices, or
    uint8 ``(N, L)`` 0/1 indicators for a multi-label task.
    """

    images: np.ndarray
    labels: np.ndarray
    task: str
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def multi_label(self) -> bool:
        return self.task == "multi-label, binary-class"

    def subset(self, indices: np.ndarray) -> ImageSet:
        return ImageSet(self.images[indices], self.labels[indices], self.task, self.class_names)


@dataclass(frozen=True)
class DatasetSpec:
    """What a model and a run need to know about a data set, without its pixels."""

    name: str
    task: str
    class_names: tuple[str, ...]
    in_channels: int
    spatial_dims: int
    image_size: int
    benchmark: dict[str, dict[str, float]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True)
class Splits:
    """Train, validation and test splits of one data set, with its spec."""

    spec: DatasetSpec
    train: ImageSet
    val: ImageSet
    test: ImageSet
