"""MedMNIST v2 data sets (2D and 3D, sizes 28/64/128/224): locate, fetch, validate, load.

Files live under a data root as ``ROOT/medmnist/<flag>.npz`` (size 28) or
``ROOT/medmnist/<flag>_<size>.npz``, the names of the official Zenodo files. The
metadata (URL, MD5 per size, task, labels, channels, split sizes) comes from the
``medmnist`` package's ``INFO`` table, read without importing the package, whose
``__init__`` needs torchvision.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from platformdirs import user_cache_dir

from medbloom.data.types import DatasetSpec, ImageSet, Splits
from medbloom.errors import DataError

SPLITS = ("train", "val", "test")
SIZES_2D = (28, 64, 128, 224)
SIZES_3D = (28, 64)

# Published test-set results of the MedMNIST v2 paper (Yang et al., Scientific Data
# 10:41, 2023, Tables 3 and 4): ResNet-18 and ResNet-50 trained centrally at 28 and
# 224 pixels (2D), and ResNet-18/50 with 3D convolutions at 28 voxels (3D).
BENCHMARKS: dict[str, dict[str, dict[str, float]]] = {
    "pathmnist": {
        "resnet18-28": {"auc": 0.983, "acc": 0.907},
        "resnet18-224": {"auc": 0.989, "acc": 0.909},
        "resnet50-28": {"auc": 0.990, "acc": 0.911},
        "resnet50-224": {"auc": 0.989, "acc": 0.892},
    },
    "chestmnist": {
        "resnet18-28": {"auc": 0.768, "acc": 0.947},
        "resnet18-224": {"auc": 0.773, "acc": 0.947},
        "resnet50-28": {"auc": 0.769, "acc": 0.947},
        "resnet50-224": {"auc": 0.773, "acc": 0.948},
    },
    "dermamnist": {
        "resnet18-28": {"auc": 0.917, "acc": 0.735},
        "resnet18-224": {"auc": 0.920, "acc": 0.754},
        "resnet50-28": {"auc": 0.913, "acc": 0.735},
        "resnet50-224": {"auc": 0.912, "acc": 0.731},
    },
    "octmnist": {
        "resnet18-28": {"auc": 0.943, "acc": 0.743},
        "resnet18-224": {"auc": 0.958, "acc": 0.763},
        "resnet50-28": {"auc": 0.952, "acc": 0.762},
        "resnet50-224": {"auc": 0.958, "acc": 0.776},
    },
    "pneumoniamnist": {
        "resnet18-28": {"auc": 0.944, "acc": 0.854},
        "resnet18-224": {"auc": 0.956, "acc": 0.864},
        "resnet50-28": {"auc": 0.948, "acc": 0.854},
        "resnet50-224": {"auc": 0.962, "acc": 0.884},
    },
    "retinamnist": {
        "resnet18-28": {"auc": 0.717, "acc": 0.524},
        "resnet18-224": {"auc": 0.710, "acc": 0.493},
        "resnet50-28": {"auc": 0.726, "acc": 0.528},
        "resnet50-224": {"auc": 0.716, "acc": 0.511},
    },
    "breastmnist": {
        "resnet18-28": {"auc": 0.901, "acc": 0.863},
        "resnet18-224": {"auc": 0.891, "acc": 0.833},
        "resnet50-28": {"auc": 0.857, "acc": 0.812},
        "resnet50-224": {"auc": 0.866, "acc": 0.842},
    },
    "bloodmnist": {
        "resnet18-28": {"auc": 0.998, "acc": 0.958},
        "resnet18-224": {"auc": 0.998, "acc": 0.963},
        "resnet50-28": {"auc": 0.997, "acc": 0.956},
        "resnet50-224": {"auc": 0.997, "acc": 0.950},
    },
    "tissuemnist": {
        "resnet18-28": {"auc": 0.930, "acc": 0.676},
        "resnet18-224": {"auc": 0.933, "acc": 0.681},
        "resnet50-28": {"auc": 0.931, "acc": 0.680},
        "resnet50-224": {"auc": 0.932, "acc": 0.680},
    },
    "organamnist": {
        "resnet18-28": {"auc": 0.997, "acc": 0.935},
        "resnet18-224": {"auc": 0.998, "acc": 0.951},
        "resnet50-28": {"auc": 0.997, "acc": 0.935},
        "resnet50-224": {"auc": 0.998, "acc": 0.947},
    },
    "organcmnist": {
        "resnet18-28": {"auc": 0.992, "acc": 0.900},
        "resnet18-224": {"auc": 0.994, "acc": 0.920},
        "resnet50-28": {"auc": 0.992, "acc": 0.905},
        "resnet50-224": {"auc": 0.993, "acc": 0.911},
    },
    "organsmnist": {
        "resnet18-28": {"auc": 0.972, "acc": 0.782},
        "resnet18-224": {"auc": 0.974, "acc": 0.778},
        "resnet50-28": {"auc": 0.972, "acc": 0.770},
        "resnet50-224": {"auc": 0.975, "acc": 0.785},
    },
    "organmnist3d": {
        "resnet18-3d-28": {"auc": 0.996, "acc": 0.907},
        "resnet50-3d-28": {"auc": 0.994, "acc": 0.883},
    },
    "nodulemnist3d": {
        "resnet18-3d-28": {"auc": 0.863, "acc": 0.844},
        "resnet50-3d-28": {"auc": 0.875, "acc": 0.847},
    },
    "adrenalmnist3d": {
        "resnet18-3d-28": {"auc": 0.827, "acc": 0.721},
        "resnet50-3d-28": {"auc": 0.828, "acc": 0.745},
    },
    "fracturemnist3d": {
        "resnet18-3d-28": {"auc": 0.712, "acc": 0.508},
        "resnet50-3d-28": {"auc": 0.725, "acc": 0.494},
    },
    "vesselmnist3d": {
        "resnet18-3d-28": {"auc": 0.874, "acc": 0.877},
        "resnet50-3d-28": {"auc": 0.907, "acc": 0.918},
    },
    "synapsemnist3d": {
        "resnet18-3d-28": {"auc": 0.820, "acc": 0.745},
        "resnet50-3d-28": {"auc": 0.851, "acc": 0.795},
    },
}


@cache
def _info_module() -> ModuleType:
    spec = importlib.util.find_spec("medmnist")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the medmnist package (its metadata table) is not installed: "
            "run `pip install --no-deps medmnist==3.0.2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "info.py"
    mod_spec = importlib.util.spec_from_file_location("_medbloom_medmnist_info", path)
    assert mod_spec is not None and mod_spec.loader is not None
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def info() -> dict[str, dict[str, Any]]:
    """MedMNIST's ``INFO`` table: flag -> metadata."""
    table: dict[str, dict[str, Any]] = _info_module().INFO
    return table


def flags() -> list[str]:
    """Every MedMNIST data set name, 2D first, in the official order."""
    return list(info())


def is_3d(flag: str) -> bool:
    return flag.endswith("3d")


def sizes(flag: str) -> tuple[int, ...]:
    """Image sizes published for a data set."""
    return SIZES_3D if is_3d(flag) else SIZES_2D


def _entry(flag: str) -> dict[str, Any]:
    table = info()
    if flag not in table:
        raise DataError(f"--dataset {flag!r} is unknown: expected one of {', '.join(table)}")
    return table[flag]


def _check_size(flag: str, size: int) -> None:
    if size not in sizes(flag):
        raise DataError(
            f"--size {size} is not published for {flag}: expected one of "
            + ", ".join(map(str, sizes(flag)))
        )


def file_name(flag: str, size: int) -> str:
    """The official file name: ``pneumoniamnist.npz`` or ``pneumoniamnist_64.npz``."""
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def url_and_md5(flag: str, size: int) -> tuple[str, str]:
    entry = _entry(flag)
    _check_size(flag, size)
    suffix = "" if size == 28 else f"_{size}"
    return str(entry[f"url{suffix}"]), str(entry[f"MD5{suffix}"])


def default_data_root() -> Path:
    """``$MEDBLOOM_DATA_DIR`` if set, else the user's cache directory."""
    env = os.environ.get("MEDBLOOM_DATA_DIR")
    return Path(env) if env else Path(user_cache_dir("medbloom"))


def resolve_data_root(data_dir: str | os.PathLike[str] | None) -> Path:
    return Path(data_dir).expanduser() if data_dir else default_data_root()


def file_path(flag: str, size: int, root: str | os.PathLike[str] | None = None) -> Path:
    return resolve_data_root(root) / "medmnist" / file_name(flag, size)


def spec_for(flag: str, size: int) -> DatasetSpec:
    """The metadata of a MedMNIST set, without reading its file."""
    entry = _entry(flag)
    _check_size(flag, size)
    labels = entry["label"]
    names = tuple(str(labels[str(i)]) for i in range(len(labels)))
    return DatasetSpec(
        name=flag,
        task=str(entry["task"]),
        class_names=names,
        in_channels=int(entry["n_channels"]),
        spatial_dims=3 if is_3d(flag) else 2,
        image_size=size,
        benchmark=BENCHMARKS.get(flag, {}),
        extra={"n_samples": dict(entry["n_samples"]), "license": entry.get("license", "")},
    )


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fetch(
    flag: str,
    size: int = 28,
    root: str | os.PathLike[str] | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Return the path of a data set file, downloading it (MD5-checked) if absent.

    The download goes to a temporary file in the target folder and is renamed into
    place only after its MD5 matches, so an interrupted download leaves nothing
    that looks like a data set.
    """
    url, md5 = url_and_md5(flag, size)
    target = file_path(flag, size, root)
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create data directory {target.parent}: {exc.strerror}") from None
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            _download(url, out, progress=progress, timeout=timeout, label=target.name)
        got = md5sum(tmp)
        if got != md5:
            raise DataError(
                f"download of {target.name} from {url} is corrupt: MD5 {got}, expected {md5}"
            )
        os.replace(tmp, target)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DataError(
            f"{target.name} is not in {target.parent} and could not be downloaded ({reason}); "
            f"fetch it from {url} and save it as {target}"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _download(url: str, out: Any, progress: bool, timeout: float, label: str) -> None:
    from medbloom.progress import progress_bar

    request = urllib.request.Request(url, headers={"User-Agent": "medbloom"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with progress_bar(total, f"download {label}", "B", progress, scale=True) as bar:
            while block := response.read(1 << 16):
                out.write(block)
                bar.update(len(block))


def load(
    flag: str,
    size: int = 28,
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    progress: bool = True,
) -> Splits:
    """Load and validate a MedMNIST data set, downloading it first if needed."""
    spec = spec_for(flag, size)
    path = file_path(flag, size, root)
    if not path.is_file():
        if not download:
            url, _ = url_and_md5(flag, size)
            raise DataError(f"{path} not found; fetch it from {url}")
        path = fetch(flag, size, root, progress=progress)
    return load_file(path, spec)


def load_file(path: Path, spec: DatasetSpec) -> Splits:
    """Read an npz in the official format and check it against the data set's metadata."""
    arrays = _read_npz(path)
    sets = {split: _validate_split(path, spec, split, arrays) for split in SPLITS}
    return Splits(spec=spec, **sets)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    wanted = [f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels")]
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in wanted if k not in npz.files]
            if missing:
                raise DataError(
                    f"{path}: missing arrays {', '.join(missing)}; "
                    f"a MedMNIST file holds {', '.join(wanted)}"
                )
            return {k: npz[k] for k in wanted}
    except DataError:
        raise
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, TypeError, zlib.error) as exc:
        raise DataError(
            f"{path}: not a readable npz file (truncated or corrupt?): {exc}; "
            "delete it to download it again"
        ) from None


def _validate_split(
    path: Path, spec: DatasetSpec, split: str, arrays: dict[str, np.ndarray]
) -> ImageSet:
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    where = f"{path}: {split}"
    if images.dtype != np.uint8:
        raise DataError(f"{where}_images has dtype {images.dtype}, expected uint8")
    s = spec.image_size
    spatial = (s, s, s) if spec.spatial_dims == 3 else (s, s)
    expected = spatial if spec.in_channels == 1 else (*spatial, spec.in_channels)
    if images.ndim < 1 or images.shape[1:] != expected:
        raise DataError(
            f"{where}_images has shape {images.shape}, "
            f"expected (N, {', '.join(map(str, expected))})"
        )
    n = images.shape[0]
    n_labels = spec.num_classes if spec.task == "multi-label, binary-class" else 1
    if labels.ndim != 2 or labels.shape != (n, n_labels):
        raise DataError(f"{where}_labels has shape {labels.shape}, expected ({n}, {n_labels})")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}_labels has dtype {labels.dtype}, expected integers")
    if n == 0:
        raise DataError(f"{where} split is empty")
    upper = 1 if n_labels > 1 else spec.num_classes - 1
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi > upper:
        raise DataError(
            f"{where}_labels range from {lo} to {hi}, expected 0 to {upper} "
            f"({spec.num_classes} classes of {spec.name})"
        )
    if spec.in_channels == 1:
        images = images[:, None]
    else:
        images = np.moveaxis(images, -1, 1)
    images = np.ascontiguousarray(images)
    out_labels = labels.astype(np.uint8) if n_labels > 1 else labels[:, 0].astype(np.int64)
    return ImageSet(images, out_labels, spec.task, spec.class_names)
