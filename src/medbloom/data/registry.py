"""Data sets by name: every MedMNIST flag (2D and 3D)."""

from __future__ import annotations

import os

from medbloom.data import medmnist
from medbloom.data.types import DatasetSpec, Splits
from medbloom.errors import DataError


def dataset_names() -> list[str]:
    """Every name ``--dataset`` accepts."""
    return medmnist.flags()


def spec_of(name: str, size: int) -> DatasetSpec:
    """Metadata of a data set (task, classes, channels, 2D/3D) without reading any file."""
    if name in medmnist.info():
        return medmnist.spec_for(name, size)
    raise DataError(f"--dataset {name!r} is unknown: expected one of {', '.join(dataset_names())}")


def load_dataset(
    name: str,
    size: int,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    progress: bool = True,
) -> Splits:
    """Load all splits of a data set, fetching it first where that is possible."""
    spec_of(name, size)
    return medmnist.load(name, size, data_dir, download=download, progress=progress)
