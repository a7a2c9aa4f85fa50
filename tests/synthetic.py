"""Small synthetic MedMNIST files in the official npz format, for tests.

A file holds ``train_images``, ``train_labels``, ``val_images``, ``val_labels``,
``test_images`` and ``test_labels``. Images are uint8: ``(N, S, S)`` for gray 2D
sets, ``(N, S, S, 3)`` for RGB sets and ``(N, S, S, S)`` for 3D sets. Labels are
``(N, 1)`` class indices, or ``(N, 14)`` 0/1 indicators for the multi-label
``chestmnist``. Files are named ``ROOT/medmnist/<flag>.npz`` (size 28) or
``ROOT/medmnist/<flag>_<size>.npz``, and written compressed, as the official ones are.

The shape facts below are written out here on purpose (not read from the code under
test), so a test that loads one of these files checks the loader against them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")
KEYS = tuple(f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels"))


@dataclass(frozen=True)
class Layout:
    """What a MedMNIST file of one data set looks like."""

    channels: int
    num_classes: int
    task: str
    volumetric: bool = False

    @property
    def multi_label(self) -> bool:
        return self.task == "multi-label, binary-class"


LAYOUTS: dict[str, Layout] = {
    "pathmnist": Layout(3, 9, "multi-class"),
    "chestmnist": Layout(1, 14, "multi-label, binary-class"),
    "dermamnist": Layout(3, 7, "multi-class"),
    "octmnist": Layout(1, 4, "multi-class"),
    "pneumoniamnist": Layout(1, 2, "binary-class"),
    "retinamnist": Layout(3, 5, "ordinal-regression"),
    "breastmnist": Layout(1, 2, "binary-class"),
    "bloodmnist": Layout(3, 8, "multi-class"),
    "tissuemnist": Layout(1, 8, "multi-class"),
    "organamnist": Layout(1, 11, "multi-class"),
    "organcmnist": Layout(1, 11, "multi-class"),
    "organsmnist": Layout(1, 11, "multi-class"),
    "organmnist3d": Layout(1, 11, "multi-class", volumetric=True),
    "nodulemnist3d": Layout(1, 2, "binary-class", volumetric=True),
    "adrenalmnist3d": Layout(1, 2, "binary-class", volumetric=True),
    "fracturemnist3d": Layout(1, 3, "multi-class", volumetric=True),
    "vesselmnist3d": Layout(1, 2, "binary-class", volumetric=True),
    "synapsemnist3d": Layout(1, 2, "binary-class", volumetric=True),
}

DEFAULT_COUNTS = {"train": 24, "val": 8, "test": 10}


def file_name(flag: str, size: int = 28) -> str:
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def npz_path(root: Path, flag: str, size: int = 28) -> Path:
    return Path(root) / "medmnist" / file_name(flag, size)


def image_shape(flag: str, size: int = 28) -> tuple[int, ...]:
    """Shape of one image as stored in the file (channels last, no channel axis if gray)."""
    layout = LAYOUTS[flag]
    spatial = (size, size, size) if layout.volumetric else (size, size)
    return spatial if layout.channels == 1 else (*spatial, layout.channels)


def make_labels(flag: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Labels of ``n`` samples; every class (every label value) occurs when ``n`` allows."""
    layout = LAYOUTS[flag]
    if layout.multi_label:
        labels = (rng.random((n, layout.num_classes)) < 0.3).astype(np.uint8)
        if n >= 2:  # every label column has both values
            labels[0, :] = 1
            labels[1, :] = 0
        return labels
    classes = np.arange(n) % layout.num_classes
    return rng.permutation(classes).astype(np.uint8).reshape(n, 1)


def make_arrays(
    flag: str,
    size: int = 28,
    counts: dict[str, int] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """The six arrays of a valid file for this data set and size."""
    counts = {**DEFAULT_COUNTS, **(counts or {})}
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for split in SPLITS:
        n = counts[split]
        arrays[f"{split}_images"] = rng.integers(
            0, 256, size=(n, *image_shape(flag, size)), dtype=np.uint8
        )
        arrays[f"{split}_labels"] = make_labels(flag, n, rng)
    return arrays


def write_arrays(path: Path, arrays: dict[str, np.ndarray], compressed: bool = True) -> Path:
    """Write arrays as an npz at exactly ``path`` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        (np.savez_compressed if compressed else np.savez)(fh, **arrays)
    return path


def write_npz(
    root: Path,
    flag: str,
    size: int = 28,
    arrays: dict[str, np.ndarray] | None = None,
    **kwargs: object,
) -> Path:
    """Write a file at ``ROOT/medmnist/<official name>``; valid unless ``arrays`` says otherwise.

    ``kwargs`` go to :func:`make_arrays` (``counts``, ``seed``).
    """
    if arrays is None:
        arrays = make_arrays(flag, size, **kwargs)  # type: ignore[arg-type]
    return write_arrays(npz_path(root, flag, size), arrays)


def md5_of(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()
