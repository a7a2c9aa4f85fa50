"""Class-folder image data sets (such as Brain Tumor MRI): list, decode, crop, cache, split.

Three layouts are read (folder names matched case-insensitively):

- ``ROOT/Training/<class>/*`` and ``ROOT/Testing/<class>/*`` (or ``train`` and ``test``);
- ``ROOT/<class>/*``: a seeded, stratified test split of ``test_fraction`` is carved out;
- ``ROOT/Training/<class>/*`` alone: as the previous layout, inside ``Training``.

Class names are the class folders' names, sorted; a data set with fixed classes (Brain
Tumor MRI) passes :class:`KnownClasses` instead, which maps each folder's name onto one of
its classes, so that sets distributed with other folder names (``glioma_tumor``,
``No Tumor``) load with the same names and labels.

The validation split is always carved from the training images (seeded, stratified),
since the server selects its best model on it and must never see test images.

Every image is decoded once (any format Pillow reads, EXIF orientation applied), cropped
to its largest foreground region, padded to a square, resized and stored as uint8 arrays
in an on-disk cache; a later load with the same files and preprocessing reads the arrays
only. Splitting happens after the cache, so another seed or fraction needs no decoding.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import re
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import scipy
from PIL import Image, ImageOps, UnidentifiedImageError
from platformdirs import user_cache_dir
from scipy import ndimage

from medbloom.data.types import DatasetSpec, ImageSet, Splits
from medbloom.errors import ConfigError, DataError
from medbloom.system import usable_cpus

__all__ = [
    "FOLDER_LAYOUT_HELP",
    "KnownClasses",
    "SkippedFileWarning",
    "crop_to_foreground",
    "default_cache_dir",
    "folder_spec",
    "load_folder_dataset",
    "preprocess_image",
]

FOLDER_LAYOUT_HELP = (
    "ROOT/Training/<class>/* and ROOT/Testing/<class>/* (or train/ and test/), or ROOT/<class>/*"
)

# Bump when the decoded arrays would change for the same files and settings.
CACHE_FORMAT_VERSION = 1

TRAIN_NAMES = ("training", "train")
TEST_NAMES = ("testing", "test")

# The brain-tumour community's OpenCV recipe: GaussianBlur((5, 5), 0), which is sigma 1.1
# with a radius of 2; threshold at 45 of 255; erode then dilate twice with a 3x3 kernel.
FOREGROUND_THRESHOLD = 45
BLUR_SIGMA = 1.1
BLUR_RADIUS = 2
MORPH_ITERATIONS = 2

# JPEGs are decoded at 1/2, 1/4 or 1/8 scale straight from the DCT coefficients when the
# result is still at least this many pixels (and twice the output size) on each side:
# decoding, blurring and labelling a 512-pixel MRI at 256 pixels is 3-4 times faster.
# The brain's crop is then still larger than the output (on Brain Tumor MRI at 128 pixels,
# 0.7% of crops come out smaller, against none decoded in full).
MIN_DRAFT_SIZE = 256

# Below this many files per worker, starting processes costs more than it saves.
MIN_FILES_PER_WORKER = 64
MAX_SKIP_WARNINGS = 20

_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class SkippedFileWarning(UserWarning):
    """A file in a class folder could not be read as an image and was left out."""


@dataclass(frozen=True)
class KnownClasses:
    """A data set's fixed classes, and which class folders hold each of them.

    Attributes
    ----------
    names
        The class names, in label order: class ``names[i]`` has label ``i`` whatever
        order its folder sorts in.
    match
        A class folder's name to one of ``names``, or None for a folder of no class.
    accepted
        The folder names ``match`` takes, in words, for error messages.
    """

    names: tuple[str, ...]
    match: Callable[[str], str | None]
    accepted: str


@dataclass(frozen=True)
class _Layout:
    kind: str  # "train-test" or "single-folder"
    train_dir: Path
    test_dir: Path | None


@dataclass(frozen=True)
class _Listing:
    """Every candidate file, in a fixed order: class, then relative path."""

    paths: tuple[Path, ...]
    relpaths: tuple[str, ...]
    labels: np.ndarray  # int64 class index per file
    from_test: np.ndarray  # bool: the file lies in the test folder
    class_names: tuple[str, ...]
    class_dirs: tuple[Path, ...]  # training folder of each class


# ---------------------------------------------------------------------------
# One image
# ---------------------------------------------------------------------------


def crop_to_foreground(
    gray: np.ndarray, *, threshold: int = FOREGROUND_THRESHOLD
) -> tuple[int, int, int, int]:
    """Bounding box of the largest bright region of a grayscale image.

    The recipe the brain-tumour MRI community uses with OpenCV (Gaussian blur, binary
    threshold, erode and dilate twice, largest external contour, its bounding box), done
    with scipy.ndimage. The largest region is the 8-connected component with the most
    pixels, not the largest contour area: the two differ only for a ring whose hole is
    larger than a solid competitor, which a skull-stripped or raw MRI slice does not have.

    Parameters
    ----------
    gray
        A 2D array on the 0-255 scale (uint8 as decoded).
    threshold
        Blurred pixels strictly above this value are foreground.

    Returns
    -------
    tuple of int
        ``(top, bottom, left, right)`` in slice convention: the region is
        ``gray[top:bottom, left:right]``. The whole image when nothing is bright.
    """
    if gray.ndim != 2:
        raise ValueError(f"crop_to_foreground expects a 2D grayscale image, got {gray.shape}")
    height, width = gray.shape
    whole = (0, int(height), 0, int(width))
    if height == 0 or width == 0:
        return whole
    # mode="mirror" is OpenCV's default border (BORDER_REFLECT_101).
    blurred = ndimage.gaussian_filter(
        gray.astype(np.float32), BLUR_SIGMA, radius=BLUR_RADIUS, mode="mirror"
    )
    mask = (blurred > threshold).astype(np.uint8)
    # Eroding twice with a 3x3 square is one erosion with a 5x5 square; the separable
    # min/max filters are several times faster than binary_erosion with iterations.
    # mode="nearest" matches OpenCV, whose erode/dilate ignore pixels outside the image.
    size = 2 * MORPH_ITERATIONS + 1
    mask = ndimage.minimum_filter(mask, size=size, mode="nearest")
    mask = ndimage.maximum_filter(mask, size=size, mode="nearest")
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return whole
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    largest = int(sizes.argmax())
    box = ndimage.find_objects(labels, max_label=largest)[largest - 1]
    assert box is not None
    rows, cols = box
    return int(rows.start), int(rows.stop), int(cols.start), int(cols.stop)


def _to_8bit(image: Image.Image) -> Image.Image:
    """Any Pillow mode to ``L`` or ``RGB``: 16/32-bit by the image's own min-max, alpha
    composited on black (the background of an MRI), palettes and CMYK to RGB."""
    mode = image.mode
    if mode in ("L", "RGB"):
        return image
    if mode in _INT_MODES:
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        low, high = float(values.min()), float(values.max())
        if high > low:
            scaled = np.rint((values - low) * (255.0 / (high - low)))
        else:
            scaled = np.zeros_like(values)
        return Image.fromarray(scaled.astype(np.uint8))
    if mode == "1":
        return image.convert("L")
    if mode == "P":
        has_alpha = "transparency" in image.info or (
            image.palette is not None and image.palette.mode == "RGBA"
        )
        image = image.convert("RGBA" if has_alpha else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in _ALPHA_MODES:
        # Premultiplied modes (RGBa, La) are converted back to straight alpha first.
        straight = image.convert("LA" if mode in ("LA", "La") else "RGBA")
        pixels = np.asarray(straight, dtype=np.uint16)
        color, alpha = pixels[..., :-1], pixels[..., -1:]
        out = ((color * alpha + 127) // 255).astype(np.uint8)
        if out.shape[-1] == 1:
            return Image.fromarray(out[..., 0])
        return Image.fromarray(out)
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV


def _read_image(path: Path, draft_size: int) -> Image.Image:
    """Decode an image file into ``L`` or ``RGB``, EXIF orientation applied."""
    with Image.open(path) as opened:
        # draft only affects JPEGs; other formats decode at full size.
        opened.draft(None, (draft_size, draft_size))
        opened.load()
        oriented = ImageOps.exif_transpose(opened)
        return _to_8bit(oriented)


def _square(image: Image.Image) -> Image.Image:
    """Pad to a square with black, centred.

    Padding rather than stretching the crop keeps the anatomy's proportions: the crops
    of axial, coronal and sagittal slices have different aspect ratios, and stretching
    would distort a tumour's shape differently in each. MRI backgrounds are black, so
    the padding looks like the background the crop removed.
    """
    width, height = image.size
    side = max(width, height)
    if width == height:
        return image
    canvas = Image.new(image.mode, (side, side), 0)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def preprocess_image(
    path: str | os.PathLike[str], *, image_size: int, channels: int, crop: bool = True
) -> np.ndarray:
    """Decode one image file as the data set loader does: ``(C, S, S)`` uint8.

    EXIF orientation first; then 8-bit gray or RGB; then the crop to the largest
    foreground region (found on the grayscale version); then a black pad to a square
    and an antialiased resize (Pillow's bicubic filter widens with the reduction
    factor, so a downscale averages every source pixel).

    Raises whatever Pillow raises for an unreadable file (``OSError``, ``ValueError``...).
    """
    _check_settings(image_size, channels)
    image = _read_image(Path(path), max(2 * image_size, MIN_DRAFT_SIZE))
    gray = image if image.mode == "L" else image.convert("L")
    if crop:
        top, bottom, left, right = crop_to_foreground(np.asarray(gray))
        image = image.crop((left, top, right, bottom))
    if channels == 1:
        image = image.convert("L")
    elif image.mode != "RGB":
        image = image.convert("RGB")
    image = _square(image).resize((image_size, image_size), Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.uint8)
    if pixels.ndim == 2:
        return pixels[None].copy()
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _decode_task(task: tuple[str, int, int, bool]) -> tuple[np.ndarray | None, str | None]:
    """Worker body: one file to an array, or to the reason it could not be read."""
    path, image_size, channels, crop = task
    try:
        return preprocess_image(path, image_size=image_size, channels=channels, crop=crop), None
    except UnidentifiedImageError:
        return None, "not a format Pillow can identify"
    # Pillow's decoders raise OSError, ValueError, SyntaxError, EOFError, struct.error,
    # zlib.error, DecompressionBombError... for bad files: any of them means "skip it".
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------


def _hidden(name: str) -> bool:
    return name.startswith((".", "__"))  # .DS_Store, .ipynb_checkpoints, __MACOSX


def _subdirs(folder: Path) -> list[Path]:
    # Sorted by the name as a string: Path order ignores case on Windows, and hospitals
    # on different systems must agree on which class is index 0.
    try:
        entries = sorted(folder.iterdir(), key=lambda entry: entry.name)
    except OSError as exc:
        raise DataError(f"{folder}: cannot list the folder ({exc.strerror})") from None
    return [e for e in entries if not _hidden(e.name) and e.is_dir()]


def _find_layout(root: Path) -> _Layout:
    if not root.exists():
        raise DataError(f"{root}: folder not found; expected {FOLDER_LAYOUT_HELP}")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; expected {FOLDER_LAYOUT_HELP}")
    subdirs = _subdirs(root)
    train = [d for d in subdirs if d.name.lower() in TRAIN_NAMES]
    test = [d for d in subdirs if d.name.lower() in TEST_NAMES]
    for found in (train, test):
        if len(found) > 1:
            names = " and ".join(d.name for d in found)
            raise DataError(f"{root}: both {names}; expected one training and one test folder")
    if test and not train:
        raise DataError(
            f"{root}: a {test[0].name} folder but no Training (or train) folder beside it; "
            f"expected {FOLDER_LAYOUT_HELP}"
        )
    if not train:
        return _Layout("single-folder", root, None)
    others = [d.name for d in subdirs if d not in train and d not in test]
    if others:
        warnings.warn(
            f"{root}: ignoring folder(s) {', '.join(others)}: only {train[0].name}"
            + (f" and {test[0].name}" if test else "")
            + " are read, and validation images are carved from the training folder",
            SkippedFileWarning,
            stacklevel=3,
        )
    if not test:
        return _Layout("single-folder", train[0], None)
    return _Layout("train-test", train[0], test[0])


def _class_dirs(folder: Path) -> list[Path]:
    dirs = _subdirs(folder)
    if not dirs:
        loose = sum(1 for e in folder.iterdir() if e.is_file() and not _hidden(e.name))
        found = f" (found {loose} files directly in it)" if loose else ""
        raise DataError(
            f"{folder}: no class folders{found}; expected one subfolder per class "
            f"holding its images: {FOLDER_LAYOUT_HELP}"
        )
    return dirs


def _files_in(class_dir: Path) -> list[Path]:
    """Every non-hidden file under a class folder, subfolders included, sorted."""
    out: list[Path] = []
    for current, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        out.extend(Path(current) / f for f in sorted(filenames) if not _hidden(f))
    if not out:
        raise DataError(
            f"{class_dir}: empty class folder; expected image files of class {class_dir.name!r}"
        )
    return sorted(out, key=lambda path: path.as_posix())


def _by_class(folder: Path, dirs: Sequence[Path], classes: KnownClasses | None) -> dict[str, Path]:
    """Each class found among a folder's class folders, to its folder (in folder order)."""
    if classes is None:
        return {d.name: d for d in dirs}
    found: dict[str, Path] = {}
    for d in dirs:
        name = classes.match(d.name)
        if name not in classes.names:
            raise DataError(
                f"{d}: class folder {d.name!r} is none of the classes "
                f"{', '.join(classes.names)}; expected folders named {classes.accepted}"
            )
        if name in found:
            raise DataError(
                f"{folder}: class folders {found[name].name!r} and {d.name!r} are both class "
                f"{name!r}; expected one folder per class, named {classes.accepted}"
            )
        found[name] = d
    return found


def _list_files(root: Path, layout: _Layout, classes: KnownClasses | None = None) -> _Listing:
    train_dirs = _class_dirs(layout.train_dir)
    train_by_class = _by_class(layout.train_dir, train_dirs, classes)
    if classes is None:
        if len(train_dirs) < 2:
            raise DataError(
                f"{layout.train_dir}: only one class folder ({train_dirs[0].name}); "
                "expected at least two, one per class"
            )
        class_names = tuple(train_by_class)
    else:
        absent = [name for name in classes.names if name not in train_by_class]
        if absent:
            raise DataError(
                f"{layout.train_dir}: no class folder for {', '.join(absent)} (found "
                f"{', '.join(d.name for d in train_dirs)}); expected one folder per class, "
                f"named {classes.accepted}"
            )
        class_names = classes.names
    class_dirs = [train_by_class[name] for name in class_names]
    index = {name: i for i, name in enumerate(class_names)}
    # The training folders are checked completely before the test folder is looked at,
    # so the first error is about the folder that defines the classes.
    per_folder = [(_files_in(d), i, False) for i, d in enumerate(class_dirs)]
    if layout.test_dir is not None:
        test_by_class = _by_class(layout.test_dir, _class_dirs(layout.test_dir), classes)
        for name, d in test_by_class.items():
            if name not in index:
                raise DataError(
                    f"{d}: class {d.name!r} is not among the training classes in "
                    f"{layout.train_dir} ({', '.join(class_names)}); expected the same "
                    "class folders in both"
                )
        per_folder += [
            (_files_in(test_by_class[name]), i, True)
            for i, name in enumerate(class_names)
            if name in test_by_class
        ]
        missing = [name for name in class_names if name not in test_by_class]
        if missing:
            warnings.warn(
                f"{layout.test_dir}: no test folder for class(es) {', '.join(missing)}; "
                "per-class test metrics for them will be undefined",
                stacklevel=3,
            )
    paths = [p for files, _, _ in per_folder for p in files]
    return _Listing(
        paths=tuple(paths),
        relpaths=tuple(p.relative_to(root).as_posix() for p in paths),
        labels=np.concatenate(
            [np.full(len(files), label, dtype=np.int64) for files, label, _ in per_folder]
        ),
        from_test=np.concatenate(
            [np.full(len(files), is_test, dtype=bool) for files, _, is_test in per_folder]
        ),
        class_names=class_names,
        class_dirs=tuple(class_dirs),
    )


# ---------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Where decoded arrays are kept: the user cache directory's ``folders`` subfolder
    (``~/.cache/medbloom/folders`` on Linux), beside the downloaded MedMNIST files."""
    return Path(user_cache_dir("medbloom")) / "folders"


def _cache_key(listing: _Listing, settings: dict[str, Any]) -> str:
    """Settings, then each file's relative path, size, time, label and split: renaming,
    adding or removing a file or folder, or mapping a folder to another class, changes it."""
    digest = hashlib.sha256()
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for path, rel, label, is_test in zip(
        listing.paths, listing.relpaths, listing.labels, listing.from_test, strict=True
    ):
        try:
            stat = path.stat()
        except OSError as exc:
            raise DataError(f"{path}: cannot read the file ({exc.strerror})") from None
        # surrogateescape: a file name that is not UTF-8 (b"\xff.png" on Linux) reaches
        # Python with lone surrogates, which plain UTF-8 cannot encode; its bytes can be
        record = f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\0{label}{is_test:d}\n"
        digest.update(record.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _cache_path(cache_dir: Path, name: str, key: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "folder"
    return cache_dir / f"{slug[:60]}-{key[:24]}.npz"


@contextlib.contextmanager
def _cache_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock beside a cache file while it is looked up and built, so
    simulated clients starting together decode the data set once, not once each."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; the atomic rename still keeps the file whole
        yield
        return
    try:
        handle = open(path.with_name(path.name + ".lock"), "a")  # noqa: SIM115
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@dataclass(frozen=True)
class _Decoded:
    """Every readable file's arrays, in listing order, with what was skipped."""

    images: np.ndarray
    labels: np.ndarray
    from_test: np.ndarray
    relpaths: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]  # (relative path, reason)


def _read_cache(path: Path, key: str) -> _Decoded | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
            if meta.get("key") != key:
                return None
            decoded = _Decoded(
                images=npz["images"],
                labels=npz["labels"].astype(np.int64),
                from_test=npz["from_test"].astype(bool),
                relpaths=tuple(meta["relpaths"]),
                skipped=tuple((str(p), str(r)) for p, r in meta["skipped"]),
            )
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        warnings.warn(f"{path}: unreadable cache file ({exc}); decoding again", stacklevel=3)
        return None
    n = len(decoded.relpaths)
    if not (len(decoded.images) == len(decoded.labels) == len(decoded.from_test) == n):
        warnings.warn(f"{path}: inconsistent cache file; decoding again", stacklevel=3)
        return None
    return decoded


def _write_cache(path: Path, key: str, decoded: _Decoded) -> bool:
    """Write atomically (temporary file, then rename); False when that is impossible."""
    meta = {"key": key, "relpaths": list(decoded.relpaths), "skipped": list(decoded.skipped)}
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
        tmp = Path(tmp_name)
        with os.fdopen(fd, "wb") as out:
            np.savez(
                out,
                images=decoded.images,
                labels=decoded.labels,
                from_test=decoded.from_test,
                meta=np.asarray(json.dumps(meta)),
            )
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        warnings.warn(
            f"{path.parent}: cannot write the decoded-image cache ({exc}); "
            "the next load will decode again",
            stacklevel=3,
        )
        return False
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return True


# ---------------------------------------------------------------------------
# Decoding many files
# ---------------------------------------------------------------------------


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork on Linux; the platform's default (spawn on macOS and Windows) elsewhere.

    spawn and forkserver run the caller's main module again in every worker, so a script
    or notebook cell without an ``if __name__ == "__main__"`` guard would load the data set
    (and do whatever else it does) once more per worker. fork does not; its known hazard,
    a lock held by another thread at fork time, needs the child to take that lock, and
    the workers only run Pillow, numpy and scipy on files, never torch, gRPC or logging.
    """
    if sys.platform == "linux":
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


def _worker_count(requested: int | None, n_files: int) -> int:
    wanted = usable_cpus() if requested is None else requested
    # A daemon process (a multiprocessing.Pool worker, say) may not start children.
    if multiprocessing.current_process().daemon:
        return 1
    return max(1, min(wanted, n_files // MIN_FILES_PER_WORKER))


def _decode_results(
    tasks: list[tuple[str, int, int, bool]], n_workers: int
) -> Iterator[tuple[np.ndarray | None, str | None]]:
    """Decode in order, in worker processes when there are several; should the workers
    die (under spawn, a script without an ``if __name__ == "__main__"`` guard cannot
    start them), the files not yet decoded are decoded in this process."""
    done = 0
    if n_workers > 1:
        chunk = max(1, min(32, len(tasks) // (n_workers * 8)))
        try:
            with ProcessPoolExecutor(max_workers=n_workers, mp_context=_pool_context()) as pool:
                for result in pool.map(_decode_task, tasks, chunksize=chunk):
                    yield result
                    done += 1
            return
        except BrokenProcessPool as exc:
            warnings.warn(
                f"decoding processes failed ({exc}); decoding the remaining "
                f"{len(tasks) - done} files in this process",
                stacklevel=4,
            )
    for task in tasks[done:]:
        yield _decode_task(task)


def _decode_all(
    listing: _Listing,
    *,
    name: str,
    image_size: int,
    channels: int,
    crop: bool,
    progress: bool,
    workers: int | None,
) -> _Decoded:
    from medbloom.progress import progress_bar

    n = len(listing.paths)
    tasks = [(str(p), image_size, channels, crop) for p in listing.paths]
    images = np.empty((n, channels, image_size, image_size), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    skipped: list[tuple[str, str]] = []
    with progress_bar(n, f"decode {name}", "img", enabled=progress) as bar:
        for i, (array, error) in enumerate(_decode_results(tasks, _worker_count(workers, n))):
            if array is not None:
                images[i] = array
                ok[i] = True
            else:
                skipped.append((listing.relpaths[i], error or "unreadable"))
            bar.update()
    return _Decoded(
        images=images[ok] if not ok.all() else images,
        labels=listing.labels[ok],
        from_test=listing.from_test[ok],
        relpaths=tuple(r for r, good in zip(listing.relpaths, ok, strict=True) if good),
        skipped=tuple(skipped),
    )


def _warn_skipped(root: Path, skipped: Sequence[tuple[str, str]]) -> None:
    for rel, reason in skipped[:MAX_SKIP_WARNINGS]:
        warnings.warn(
            f"{root / rel}: skipped, not a readable image ({reason})",
            SkippedFileWarning,
            stacklevel=3,
        )
    if len(skipped) > MAX_SKIP_WARNINGS:
        warnings.warn(
            f"{root}: {len(skipped)} unreadable files skipped in all; "
            "spec.extra['skipped_files'] lists them",
            SkippedFileWarning,
            stacklevel=3,
        )


# ---------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------


def _stratified_holdout(labels: np.ndarray, fraction: float, seed: int, stream: int) -> np.ndarray:
    """A seeded, stratified boolean mask of ``fraction`` of each class (rounded half up),
    leaving every class at least one sample outside it, and holding at least one sample
    overall when any class has two."""
    rng = np.random.default_rng([seed, stream])
    held = np.zeros(len(labels), dtype=bool)
    classes = np.unique(labels)
    for c in classes:
        members = np.flatnonzero(labels == c)
        n_held = min(int(np.floor(len(members) * fraction + 0.5)), len(members) - 1)
        held[rng.choice(members, size=n_held, replace=False)] = True
    if not held.any():
        counts = np.array([np.count_nonzero(labels == c) for c in classes])
        if counts.size and counts.max() >= 2:
            members = np.flatnonzero(labels == classes[int(counts.argmax())])
            held[rng.choice(members)] = True
    return held


def _check_settings(
    image_size: int, channels: int, val_fraction: float = 0.1, test_fraction: float = 0.2
) -> None:
    if channels not in (1, 3):
        raise ConfigError(f"channels {channels} is not supported: expected 1 (gray) or 3 (RGB)")
    if image_size < 1:
        raise ConfigError(f"image_size {image_size} is not positive: expected pixels per side")
    for label, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise ConfigError(f"{label} {value} is out of range: expected a share in (0, 1)")


def _task(class_names: Sequence[str]) -> str:
    return "binary-class" if len(class_names) == 2 else "multi-class"


def folder_spec(
    root: str | os.PathLike[str],
    *,
    name: str,
    image_size: int,
    channels: int,
    classes: KnownClasses | None = None,
) -> DatasetSpec:
    """The spec of a class-folder data set from its folder names alone, decoding nothing.

    For a registry's ``spec_of``: it lists the folders (so it raises the same
    :class:`DataError` for a bad layout or, with ``classes``, a folder of no known class,
    as :func:`load_folder_dataset`) but reads no image, so it cannot know about
    unreadable files or split sizes.
    """
    _check_settings(image_size, channels)
    root_path = Path(root).expanduser().resolve()
    layout = _find_layout(root_path)
    listing = _list_files(root_path, layout, classes)
    return DatasetSpec(
        name=name,
        task=_task(listing.class_names),
        class_names=listing.class_names,
        in_channels=channels,
        spatial_dims=2,
        image_size=image_size,
        extra={"root": str(root_path), "layout": layout.kind},
    )


def _check_classes(listing: _Listing, layout: _Layout, decoded: _Decoded, root: Path) -> None:
    if len(decoded.labels) == 0:
        raise DataError(
            f"{root}: no readable images among {len(listing.paths)} files; "
            "expected files Pillow can read (JPEG, PNG, BMP, TIFF, ...)"
        )
    train_counts = np.bincount(
        decoded.labels[~decoded.from_test], minlength=len(listing.class_names)
    )
    for i, folder in enumerate(listing.class_dirs):
        if train_counts[i] == 0:
            raise DataError(
                f"{folder}: no readable images in the class folder; "
                f"expected image files of class {listing.class_names[i]!r}"
            )
    if layout.test_dir is not None and not decoded.from_test.any():
        raise DataError(f"{layout.test_dir}: no readable test images; expected class folders")


def load_folder_dataset(
    root: str | os.PathLike[str],
    *,
    name: str,
    image_size: int,
    channels: int,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 42,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    crop: bool = True,
    workers: int | None = None,
    classes: KnownClasses | None = None,
) -> Splits:
    """Load a class-folder image data set as train, validation and test splits.

    Parameters
    ----------
    root
        The data set folder, in one of the layouts of :data:`FOLDER_LAYOUT_HELP`.
    name
        The data set's name in the returned spec (also the cache file's prefix).
    image_size
        Output pixels per side; images are ``(N, channels, image_size, image_size)``.
    channels
        1 for grayscale, 3 for RGB.
    val_fraction
        Share of each training class held out for validation (seeded, stratified).
    test_fraction
        Share of each class held out for testing when the layout has no test folder.
    seed
        Seeds the validation and test holdouts.
    cache_dir
        Where decoded arrays are kept; default :func:`default_cache_dir`.
    progress
        Show a progress bar while decoding.
    crop
        Crop each image to its largest foreground region (:func:`crop_to_foreground`).
    workers
        Decoding processes; default one per available CPU; 1 decodes in this process.
    classes
        The data set's fixed classes: every class folder (training and test) must match
        one of them, no two folders of a split the same one, and the training folder must
        hold all of them. Default: the class folders' names are the classes.

    Returns
    -------
    Splits
        Class names are the sorted training folder names, or ``classes.names`` in their
        order. ``spec.extra`` holds ``cache`` ("hit", "miss", or "off" when the cache
        could not be written), ``cache_path``, ``skipped_files`` (relative paths of
        unreadable files), ``layout``, ``root``, ``n_samples`` per split and ``files``,
        each split's relative paths in its order.

    Raises
    ------
    DataError
        The folder is missing, has no class folders, an empty class folder, a test class
        unknown to the training folder, or no readable image; with ``classes``, a class
        folder of none of them, two folders of one class, or a class without a training
        folder.
    ConfigError
        A fraction, ``channels`` or ``image_size`` is out of range.
    """
    _check_settings(image_size, channels, val_fraction, test_fraction)
    root_path = Path(root).expanduser().resolve()
    layout = _find_layout(root_path)
    listing = _list_files(root_path, layout, classes)
    # The seed and fractions only choose indices after decoding, so they stay out of
    # the key: a seed sweep reuses one cache file.
    settings = {
        "format": CACHE_FORMAT_VERSION,
        "image_size": image_size,
        "channels": channels,
        "crop": crop,
        "threshold": FOREGROUND_THRESHOLD,
        "min_draft": MIN_DRAFT_SIZE,
        "pillow": PIL.__version__,
        "scipy": scipy.__version__,
    }
    key = _cache_key(listing, settings)
    cache_path = _cache_path(
        Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(), name, key
    )
    with contextlib.ExitStack() as stack:
        with contextlib.suppress(OSError):
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(_cache_lock(cache_path))
        decoded = _read_cache(cache_path, key)
        status = "hit"
        if decoded is None:
            decoded = _decode_all(
                listing,
                name=name,
                image_size=image_size,
                channels=channels,
                crop=crop,
                progress=progress,
                workers=workers,
            )
            status = "miss" if _write_cache(cache_path, key, decoded) else "off"
    _warn_skipped(root_path, decoded.skipped)
    _check_classes(listing, layout, decoded, root_path)

    is_test = decoded.from_test.copy()
    if layout.test_dir is None:
        is_test = _stratified_holdout(decoded.labels, test_fraction, seed, stream=1)
    train_pool = np.flatnonzero(~is_test)
    is_val = _stratified_holdout(decoded.labels[train_pool], val_fraction, seed, stream=2)
    indices = {
        "train": train_pool[~is_val],
        "val": train_pool[is_val],
        "test": np.flatnonzero(is_test),
    }
    for split, idx in indices.items():
        if len(idx) == 0:
            raise DataError(
                f"{root_path}: too few readable images for a {split} split "
                f"({len(decoded.labels)} in all); expected a few per class"
            )

    task = _task(listing.class_names)
    spec = DatasetSpec(
        name=name,
        task=task,
        class_names=listing.class_names,
        in_channels=channels,
        spatial_dims=2,
        image_size=image_size,
        extra={
            "root": str(root_path),
            "layout": layout.kind,
            "cache": status,
            "cache_path": str(cache_path),
            "skipped_files": sorted(rel for rel, _ in decoded.skipped),
            "n_samples": {split: int(len(idx)) for split, idx in indices.items()},
            "crop": crop,
            # each split's files, relative to the root, in split order (the audit names them)
            "files": {split: [decoded.relpaths[i] for i in idx] for split, idx in indices.items()},
        },
    )

    def take(idx: np.ndarray) -> ImageSet:
        return ImageSet(
            np.ascontiguousarray(decoded.images[idx]),
            decoded.labels[idx].astype(np.int64),
            task,
            listing.class_names,
        )

    return Splits(
        spec=spec,
        train=take(indices["train"]),
        val=take(indices["val"]),
        test=take(indices["test"]),
    )
