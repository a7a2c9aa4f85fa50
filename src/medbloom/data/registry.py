"""Data sets by name: every MedMNIST flag (2D and 3D), Brain Tumor MRI, and folder:PATH."""

from __future__ import annotations

import os
import re
from pathlib import Path

from medbloom.data import folders, medmnist
from medbloom.data.types import DatasetSpec, Splits
from medbloom.errors import DataError

BRAIN_TUMOR_MRI = "brain-tumor-mri"
BRAIN_TUMOR_CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
FOLDER_PREFIX = "folder:"

# Folder data sets default to 64 px: brain MRI at 64 px still shows a tumour's
# shape and texture, and the small CNN then trains an epoch of the 5712 Brain Tumor
# MRI images in seconds on a CPU. ImageNet backbones do better at 224 (--size 224).
FOLDER_DEFAULT_SIZE = 64

# Class folder names as brain_tumor_class reduces them (letters only, lower case, no
# trailing tumor/tumour), to the class each stands for.
_BRAIN_TUMOR_ALIASES = {
    "glioma": "glioma",
    "meningioma": "meningioma",
    "pituitary": "pituitary",
    "pituitaryadenoma": "pituitary",
    "no": "notumor",
    "non": "notumor",
    "healthy": "notumor",
    "normal": "notumor",
}


def brain_tumor_class(folder: str) -> str | None:
    """The Brain Tumor MRI class a class folder's name stands for, or None.

    Distributions of brain-tumour MRI sets name the same four classes differently
    (``notumor``; ``no_tumor`` and ``glioma_tumor`` in Sartaj Bhuvaji's Kaggle set;
    ``No Tumour``, ``Pituitary-Tumor``...). The name is reduced to its letters in lower
    case (digits, spaces, ``_`` and ``-`` dropped), a trailing "tumor", "tumour" or their
    plural is dropped, and what remains is looked up: ``glioma``, ``meningioma``,
    ``pituitary`` (or ``pituitary adenoma``), and ``no``, ``non``, ``healthy`` or
    ``normal`` for ``notumor``.
    """
    key = "".join(char for char in folder.casefold() if char.isalpha())
    return _BRAIN_TUMOR_ALIASES.get(re.sub(r"tumou?rs?$", "", key))


BRAIN_TUMOR_FOLDERS = folders.KnownClasses(
    names=BRAIN_TUMOR_CLASSES,
    match=brain_tumor_class,
    accepted=(
        "glioma, meningioma, notumor and pituitary in any case, with any separators and "
        "an optional tumor or tumour suffix (glioma_tumor, No Tumour), or healthy or "
        "normal for notumor"
    ),
)


def default_size(name: str) -> int:
    """The image size ``--size 0`` stands for: 28 for MedMNIST, 64 for folder sets."""
    return 28 if name in medmnist.info() else FOLDER_DEFAULT_SIZE


def resolve_size(name: str, size: int) -> int:
    return size or default_size(name)


def is_folder_set(name: str) -> bool:
    """Brain Tumor MRI or ``folder:PATH``: JPEG/PNG class folders rather than MedMNIST."""
    return name == BRAIN_TUMOR_MRI or name.startswith(FOLDER_PREFIX)


def dataset_names() -> list[str]:
    """Every name ``--dataset`` accepts (``folder:PATH`` aside)."""
    return [*medmnist.flags(), BRAIN_TUMOR_MRI]


def _folder_path(name: str) -> Path:
    path = name[len(FOLDER_PREFIX) :]
    if not path:
        raise DataError(f"--dataset {name!r}: expected folder:PATH, PATH a class-folder data set")
    return Path(path).expanduser()


def spec_of(name: str, size: int) -> DatasetSpec:
    """Metadata of a data set (task, classes, channels, 2D/3D) without decoding any image."""
    size = resolve_size(name, size)
    if name in medmnist.info():
        return medmnist.spec_for(name, size)
    if name == BRAIN_TUMOR_MRI:
        return DatasetSpec(
            name=name,
            task="multi-class",
            class_names=BRAIN_TUMOR_CLASSES,
            in_channels=1,
            spatial_dims=2,
            image_size=size,
        )
    if name.startswith(FOLDER_PREFIX):
        return folders.folder_spec(_folder_path(name), name=name, image_size=size, channels=3)
    raise DataError(
        f"--dataset {name!r} is unknown: expected one of {', '.join(dataset_names())}, "
        "or folder:PATH"
    )


def load_dataset(
    name: str,
    size: int,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    progress: bool = True,
) -> Splits:
    """Load all splits of a data set, fetching it first where that is possible.

    ``brain-tumor-mri`` reads ``DATA_ROOT/brain-tumor-mri`` in any folder layout and
    class-folder naming of a four-class brain-tumour set (:func:`brain_tumor_class`):
    the classes are always :data:`BRAIN_TUMOR_CLASSES`, labelled in that order.
    """
    spec_of(name, size)
    size = resolve_size(name, size)
    if name == BRAIN_TUMOR_MRI:
        root = medmnist.resolve_data_root(data_dir) / BRAIN_TUMOR_MRI
        if not root.is_dir():
            raise DataError(
                f"{root} not found; download the Kaggle data set "
                "masoudnickparvar/brain-tumor-mri-dataset (or another four-class set, "
                "such as sartajbhuvaji/brain-tumor-classification-mri) and unpack it there "
                "(Training/<class>/*.jpg and Testing/<class>/*.jpg)"
            )
        return folders.load_folder_dataset(
            root,
            name=name,
            image_size=size,
            channels=1,
            progress=progress,
            crop=True,
            classes=BRAIN_TUMOR_FOLDERS,
        )
    if name.startswith(FOLDER_PREFIX):
        return folders.load_folder_dataset(
            _folder_path(name),
            name=name,
            image_size=size,
            channels=3,
            progress=progress,
            crop=False,
        )
    return medmnist.load(name, size, data_dir, download=download, progress=progress)
