"""Class-folder image data sets: layouts, decoding, the foreground crop, the cache, splits.

Every test writes real image files with Pillow into ``tmp_path``; the real Brain Tumor MRI
data set is read from ``../shared/datasets`` where it exists.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from medbloom.data.folders import (
    FOLDER_LAYOUT_HELP,
    SkippedFileWarning,
    crop_to_foreground,
    folder_spec,
    load_folder_dataset,
    preprocess_image,
)
from medbloom.data.registry import brain_tumor_class, load_dataset
from medbloom.data.types import Splits
from medbloom.errors import ConfigError, DataError

BRAIN_TUMOR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "brain-tumor-mri"
BRAIN_CLASSES = ("glioma", "meningioma", "notumor", "pituitary")

# (file name, mode, Pillow format) for every combination the loader must read.
FORMATS = [
    ("l.jpg", "L", "JPEG"),
    ("rgb.jpg", "RGB", "JPEG"),
    ("cmyk.jpg", "CMYK", "JPEG"),
    ("l.png", "L", "PNG"),
    ("rgb.png", "RGB", "PNG"),
    ("p.png", "P", "PNG"),
    ("rgba.png", "RGBA", "PNG"),
    ("la.png", "LA", "PNG"),
    ("i16.png", "I;16", "PNG"),
    ("rgb.bmp", "RGB", "BMP"),
    ("p.bmp", "P", "BMP"),
    ("l.tif", "L", "TIFF"),
    ("i16.tif", "I;16", "TIFF"),
    ("f.tif", "F", "TIFF"),
    ("p.gif", "P", "GIF"),
    ("one-bit.png", "1", "PNG"),
]


def bright_square(
    mode: str, size: tuple[int, int] = (48, 40), box: tuple[int, int, int, int] = (8, 30, 10, 40)
) -> Image.Image:
    """A black image (width, height) with a bright rectangle at rows box[0]:box[1],
    columns box[2]:box[3], in any Pillow mode."""
    width, height = size
    top, bottom, left, right = box
    gray = np.zeros((height, width), dtype=np.uint8)
    gray[top:bottom, left:right] = 200
    if mode in ("I;16", "F"):
        wide = gray.astype(np.float64) * 20 + 1000  # 16-bit range 1000..5000
        if mode == "F":
            return Image.fromarray(wide.astype(np.float32))
        return Image.fromarray(wide.astype(np.uint16))  # mode I;16
    base = Image.fromarray(gray)
    if mode == "1":
        return base.convert("1", dither=Image.Dither.NONE)
    if mode == "P":
        return base.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    if mode in ("L", "LA"):
        return base.convert(mode)
    return base.convert("RGB").convert(mode)


def save(image: Image.Image, path: Path, fmt: str | None = None, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **kwargs)
    return path


def write_class_tree(
    folder: Path, counts: dict[str, int], value: Callable[[str, int], int] | None = None
) -> None:
    """Uniform 12x12 gray PNGs: ``counts[class]`` files per class, pixel value from
    ``value(class, i)`` (default: a value unique to the file, to identify it later)."""
    serial = 0
    for name, count in counts.items():
        for i in range(count):
            pixel = value(name, i) if value else serial
            serial += 1
            image = Image.fromarray(np.full((12, 12), pixel, dtype=np.uint8))
            save(image, folder / name / f"{name}-{i:03d}.png")


def load(root: Path, cache: Path, **kwargs: object) -> Splits:
    options: dict[str, object] = {
        "name": "test-folders",
        "image_size": 12,
        "channels": 1,
        "cache_dir": cache,
        "progress": False,
        "crop": False,
        "workers": 1,
    }
    options.update(kwargs)
    return load_folder_dataset(root, **options)  # type: ignore[arg-type]


def pixel_ids(images: np.ndarray) -> set[int]:
    """The uniform value of each image written by ``write_class_tree``."""
    return {int(v) for v in images.reshape(len(images), -1)[:, 0]}


# ---------------------------------------------------------------------------
# crop_to_foreground
# ---------------------------------------------------------------------------


def test_crop_finds_the_box_of_a_bright_ellipse() -> None:
    height, width = 200, 300
    rows, cols = np.mgrid[:height, :width]
    center_r, center_c, radius_r, radius_c = 90, 160, 50, 80
    inside = ((rows - center_r) / radius_r) ** 2 + ((cols - center_c) / radius_c) ** 2 <= 1
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 30, size=(height, width)).astype(np.uint8)  # dim noise
    gray[inside] = 180
    gray[10:12, 10:12] = 255  # a speck that erosion removes
    gray[160:185, 20:45] = 220  # a smaller bright region that is not the largest
    top, bottom, left, right = crop_to_foreground(gray)
    assert abs(top - (center_r - radius_r)) <= 2
    assert abs(bottom - (center_r + radius_r + 1)) <= 2
    assert abs(left - (center_c - radius_c)) <= 2
    assert abs(right - (center_c + radius_c + 1)) <= 2


def test_crop_of_a_black_image_is_the_whole_image() -> None:
    assert crop_to_foreground(np.zeros((37, 53), dtype=np.uint8)) == (0, 37, 0, 53)
    # Below the threshold everywhere: still nothing found.
    assert crop_to_foreground(np.full((20, 30), 40, dtype=np.uint8)) == (0, 20, 0, 30)


def test_crop_of_a_bright_image_is_the_whole_image() -> None:
    assert crop_to_foreground(np.full((20, 30), 200, dtype=np.uint8)) == (0, 20, 0, 30)


def test_crop_rejects_a_color_array() -> None:
    with pytest.raises(ValueError, match="2D"):
        crop_to_foreground(np.zeros((10, 10, 3), dtype=np.uint8))


def test_preprocess_crops_then_resizes(tmp_path: Path) -> None:
    image = bright_square("L", size=(100, 100), box=(10, 50, 30, 70))
    path = save(image, tmp_path / "square.png")
    cropped = preprocess_image(path, image_size=16, channels=1, crop=True)
    whole = preprocess_image(path, image_size=16, channels=1, crop=False)
    assert cropped.shape == whole.shape == (1, 16, 16)
    assert cropped.dtype == np.uint8
    # The square fills the output; the crop keeps the blur's one-pixel rim, so the
    # outermost output pixels are a mix of black and bright.
    assert cropped[0, 1:-1, 1:-1].min() >= 190
    assert whole.min() == 0 and whole.max() >= 190


def test_preprocess_pads_a_wide_crop_to_a_square(tmp_path: Path) -> None:
    # A 40 x 20 bright band: padded above and below, never stretched.
    path = save(bright_square("L", size=(100, 100), box=(40, 60, 30, 70)), tmp_path / "band.png")
    out = preprocess_image(path, image_size=20, channels=1, crop=True)[0]
    assert out[:4].max() <= 10 and out[-4:].max() <= 10
    assert out[7:13, 1:-1].min() >= 190


# ---------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("file_name", "mode", "fmt"), FORMATS)
@pytest.mark.parametrize("channels", [1, 3])
def test_every_format_and_mode_decodes(
    tmp_path: Path, file_name: str, mode: str, fmt: str, channels: int
) -> None:
    path = save(bright_square(mode), tmp_path / file_name, fmt)
    with Image.open(path) as check:
        assert check.mode == mode or (mode == "I;16" and check.mode.startswith("I"))
    out = preprocess_image(path, image_size=24, channels=channels, crop=False)
    assert out.shape == (channels, 24, 24)
    assert out.dtype == np.uint8
    assert out.min() <= 10  # the black background survives
    assert out.max() >= 150  # and the bright square
    if channels == 3:
        spread = out.astype(int).max(axis=0) - out.astype(int).min(axis=0)
        assert spread.max() <= 6  # gray content stays gray in RGB (JPEG chroma aside)


def test_sixteen_bit_is_scaled_by_its_own_range(tmp_path: Path) -> None:
    ramp = np.linspace(1000, 5000, 16 * 16).reshape(16, 16).astype(np.uint16)
    path = save(Image.fromarray(ramp), tmp_path / "ramp.png")
    out = preprocess_image(path, image_size=16, channels=1, crop=False)[0]
    assert out.min() == 0 and out.max() == 255
    assert out[0, 0] == 0 and out[-1, -1] == 255


def test_alpha_is_composited_on_black(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (8, 8), (200, 100, 50, 128))
    path = save(rgba, tmp_path / "half.png")
    out = preprocess_image(path, image_size=8, channels=3, crop=False)
    assert np.abs(out[:, 4, 4].astype(int) - [100, 50, 25]).max() <= 1
    transparent = save(Image.new("RGBA", (8, 8), (255, 255, 255, 0)), tmp_path / "clear.png")
    assert preprocess_image(transparent, image_size=8, channels=1, crop=False).max() == 0


def test_palette_with_transparency(tmp_path: Path) -> None:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([255, 255, 255, 0, 0, 0, 200, 200, 200] + [0] * 759)
    image.paste(2, (0, 0, 4, 8))
    path = save(image, tmp_path / "p.png", transparency=0)
    out = preprocess_image(path, image_size=8, channels=1, crop=False)[0]
    assert out[:, :4].min() >= 195
    assert out[:, 4:].max() == 0  # white but fully transparent: black


def test_exif_orientation_is_applied_first(tmp_path: Path) -> None:
    # Stored 60 wide x 30 high, top half bright, bottom half dark; orientation 6 means
    # "rotate 90 degrees clockwise to display": 30 wide x 60 high, bright on the right.
    stored = np.full((30, 60), 60, dtype=np.uint8)
    stored[:15] = 220
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(Image.fromarray(stored), tmp_path / "rotated.jpg", "JPEG", exif=exif.tobytes())
    out = preprocess_image(path, image_size=60, channels=1, crop=False)[0].astype(int)
    # Displayed upright it is taller than wide: padded left and right, not above and below.
    assert out[:, :10].max() <= 10 and out[:, -10:].max() <= 10
    assert out[:5, 20:40].min() >= 40
    left, right = out[:, 18:27].mean(), out[:, 33:42].mean()
    assert left == pytest.approx(60, abs=8) and right == pytest.approx(220, abs=8)


def test_folder_of_mixed_formats_loads(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    for i, (file_name, mode, fmt) in enumerate(FORMATS):
        cls = "alpha" if i % 2 else "beta"
        for split in ("Training", "Testing"):
            save(bright_square(mode), root / split / cls / file_name, fmt)
    splits = load(root, tmp_path / "cache", image_size=16, channels=3, crop=True)
    assert splits.spec.class_names == ("alpha", "beta")
    assert splits.spec.task == "binary-class"
    assert splits.spec.in_channels == 3 and splits.spec.image_size == 16
    assert splits.spec.spatial_dims == 2
    assert splits.spec.extra["layout"] == "train-test"
    assert splits.spec.extra["skipped_files"] == []
    assert len(splits.train) + len(splits.val) == len(FORMATS) == len(splits.test)
    for part in (splits.train, splits.val, splits.test):
        assert part.images.dtype == np.uint8 and part.images.shape[1:] == (3, 16, 16)
        assert part.labels.dtype == np.int64
        assert part.images.flags.c_contiguous
    # Cropped to the bright square: every image is bright almost everywhere.
    assert np.median(splits.test.images) >= 190


# ---------------------------------------------------------------------------
# Bad files and bad folders
# ---------------------------------------------------------------------------


def test_corrupt_files_are_skipped_and_listed(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_class_tree(root / "Training", {"a": 10, "b": 10})
    write_class_tree(root / "Testing", {"a": 3, "b": 3})
    noise = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    whole = save(Image.fromarray(noise), tmp_path / "whole.jpg", "JPEG").read_bytes()
    (root / "Training" / "a" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "Testing" / "b" / "notes.jpg").write_text("not an image\n")
    (root / "Training" / "b" / ".DS_Store").write_bytes(b"\0\1hidden")  # ignored quietly
    with pytest.warns(SkippedFileWarning) as record:
        splits = load(root, tmp_path / "cache")
    messages = [str(w.message) for w in record]
    assert any("truncated.jpg" in m for m in messages)
    assert any("notes.jpg" in m for m in messages)
    assert not any(".DS_Store" in m for m in messages)
    assert splits.spec.extra["skipped_files"] == [
        "Testing/b/notes.jpg",
        "Training/a/truncated.jpg",
    ]
    assert len(splits.train) + len(splits.val) == 20
    assert len(splits.test) == 6
    # A cache hit reports the same skipped files, and warns again.
    with pytest.warns(SkippedFileWarning) as record:
        again = load(root, tmp_path / "cache")
    assert sorted(str(w.message).split(": skipped")[0] for w in record) == [
        str(root / "Testing" / "b" / "notes.jpg"),
        str(root / "Training" / "a" / "truncated.jpg"),
    ]
    assert again.spec.extra["cache"] == "hit"
    assert again.spec.extra["skipped_files"] == splits.spec.extra["skipped_files"]


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere: folder not found; expected ROOT/Training"):
        load(tmp_path / "nowhere", tmp_path / "cache")


def test_root_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        load(tmp_path / "file", tmp_path / "cache")


def test_no_class_folders(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    save(bright_square("L"), root / "image.png")
    with pytest.raises(DataError, match=r"flat: no class folders \(found 1 files directly in it\)"):
        load(root, tmp_path / "cache")
    (tmp_path / "split" / "Training").mkdir(parents=True)
    with pytest.raises(DataError, match="Training: no class folders"):
        load(tmp_path / "split", tmp_path / "cache")


def test_one_class_is_not_a_classification(tmp_path: Path) -> None:
    write_class_tree(tmp_path / "one", {"only": 5})
    with pytest.raises(DataError, match=r"only one class folder \(only\)"):
        load(tmp_path / "one", tmp_path / "cache")


def test_empty_class_folder(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_class_tree(root / "Training", {"a": 4, "b": 4})
    (root / "Training" / "c").mkdir()
    write_class_tree(root / "Testing", {"a": 2, "b": 2})
    with pytest.raises(DataError, match=r"Training/c: empty class folder"):
        load(root, tmp_path / "cache")


def test_class_folder_without_readable_images(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_class_tree(root, {"a": 4, "b": 4})
    (root / "c").mkdir()
    (root / "c" / "readme.txt").write_text("no images here")
    with pytest.warns(SkippedFileWarning), pytest.raises(DataError, match=r"data/c: no readable"):
        load(root, tmp_path / "cache")


def test_test_class_missing_from_training(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_class_tree(root / "Training", {"a": 4, "b": 4})
    write_class_tree(root / "Testing", {"a": 2, "b": 2, "c": 2})
    with pytest.raises(DataError, match=r"Testing/c: class 'c' is not among the training"):
        load(root, tmp_path / "cache")


def test_training_class_missing_from_test_warns(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_class_tree(root / "Training", {"a": 4, "b": 4, "c": 4})
    write_class_tree(root / "Testing", {"a": 2, "b": 2})
    with pytest.warns(UserWarning, match="no test folder for class"):
        splits = load(root, tmp_path / "cache")
    assert splits.spec.class_names == ("a", "b", "c")
    assert set(splits.test.labels.tolist()) == {0, 1}


def test_test_folder_without_training_folder(tmp_path: Path) -> None:
    write_class_tree(tmp_path / "data" / "test", {"a": 2, "b": 2})
    with pytest.raises(DataError, match="no Training"):
        load(tmp_path / "data", tmp_path / "cache")


def test_no_readable_images(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        (root / cls / "x.jpg").write_text("text, not JPEG")
    with (
        pytest.warns(SkippedFileWarning),
        pytest.raises(DataError, match=r"data: no readable images among 2 files"),
    ):
        load(root, tmp_path / "cache")


@pytest.mark.parametrize(
    ("option", "value"),
    [("channels", 2), ("image_size", 0), ("val_fraction", 0.0), ("test_fraction", 1.0)],
)
def test_bad_settings(tmp_path: Path, option: str, value: float) -> None:
    with pytest.raises(ConfigError, match=option):
        load(tmp_path, tmp_path / "cache", **{option: value})


def test_preprocess_rejects_two_channels(tmp_path: Path) -> None:
    path = save(bright_square("L"), tmp_path / "x.png")
    with pytest.raises(ConfigError, match="channels 2"):
        preprocess_image(path, image_size=8, channels=2)


def test_folder_spec_reads_folder_names_only(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_class_tree(root / "Training", {"b": 2, "a": 2, "c": 2})
    write_class_tree(root / "Testing", {"a": 1, "b": 1, "c": 1})
    (root / "Training" / "a" / "broken.png").write_text("never decoded by folder_spec")
    spec = folder_spec(root, name="mine", image_size=64, channels=3)
    assert spec.class_names == ("a", "b", "c")
    assert (spec.name, spec.task, spec.in_channels, spec.image_size) == (
        "mine",
        "multi-class",
        3,
        64,
    )
    assert spec.extra["layout"] == "train-test"
    with pytest.raises(DataError, match="folder not found"):
        folder_spec(tmp_path / "absent", name="x", image_size=8, channels=1)


def test_layout_help_names_every_layout() -> None:
    for part in ("Training", "Testing", "train", "test", "ROOT/<class>"):
        assert part in FOLDER_LAYOUT_HELP


# ---------------------------------------------------------------------------
# Layouts and splits
# ---------------------------------------------------------------------------


def test_single_folder_split_is_stratified_and_seeded(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_class_tree(root, {"x": 10, "y": 20, "z": 30})
    cache = tmp_path / "cache"
    first = load(root, cache, seed=3)
    assert first.spec.extra["layout"] == "single-folder"
    assert first.spec.task == "multi-class"
    assert np.bincount(first.test.labels).tolist() == [2, 4, 6]  # 20% of each class
    assert np.bincount(first.val.labels).tolist() == [1, 2, 2]  # 10% of the rest, rounded
    assert np.bincount(first.train.labels).tolist() == [7, 14, 22]
    ids = [pixel_ids(s.images) for s in (first.train, first.val, first.test)]
    assert set.union(*ids) == set(range(60))
    assert sum(map(len, ids)) == 60  # no image in two splits
    # Same seed, same splits; the seed is not in the cache key, so no decoding either.
    again = load(root, cache, seed=3)
    assert again.spec.extra["cache"] == "hit"
    for a, b in zip(
        (first.train, first.val, first.test), (again.train, again.val, again.test), strict=True
    ):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
    other = load(root, cache, seed=4)
    assert other.spec.extra["cache"] == "hit"
    assert pixel_ids(other.test.images) != ids[2]
    assert np.bincount(other.test.labels).tolist() == [2, 4, 6]


def test_training_folder_alone_carves_a_test_split(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_class_tree(root / "Training", {"x": 10, "y": 10})
    splits = load(root, tmp_path / "cache", test_fraction=0.3)
    assert splits.spec.extra["layout"] == "single-folder"
    assert np.bincount(splits.test.labels).tolist() == [3, 3]


def test_lowercase_train_test_layout(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_class_tree(root / "train", {"cat": 10, "dog": 10}, lambda c, i: 100 + i)
    write_class_tree(root / "test", {"cat": 3, "dog": 4}, lambda c, i: 10 + i)
    save(bright_square("L"), root / "val" / "cat" / "ignored.png")
    with pytest.warns(SkippedFileWarning, match="ignoring folder"):
        splits = load(root, tmp_path / "cache")
    assert splits.spec.extra["layout"] == "train-test"
    assert splits.spec.class_names == ("cat", "dog")
    assert np.bincount(splits.test.labels).tolist() == [3, 4]
    assert splits.test.images.max() < 100  # the test images are the test folder's
    assert splits.val.images.min() >= 100  # validation comes from the training folder
    assert np.bincount(splits.val.labels).tolist() == [1, 1]
    assert len(splits.train) == 18


def test_nested_subfolders_and_sorted_class_names(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_class_tree(root / "Zeta", {"p1": 3, "p2": 3})  # per-patient subfolders
    write_class_tree(root / "alpha", {"p1": 6})
    splits = load(root, tmp_path / "cache")
    assert splits.spec.class_names == ("Zeta", "alpha")  # sorted() order
    counts = np.bincount(
        np.concatenate([splits.train.labels, splits.val.labels, splits.test.labels])
    )
    assert counts.tolist() == [6, 6]


# ---------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------


def _touch_same_stat(path: Path, data: bytes) -> None:
    """Replace a file's bytes keeping its size and modification time."""
    stat = path.stat()
    assert len(data) == stat.st_size
    path.write_bytes(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_cache_miss_then_hit_reads_the_arrays_only(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for cls, value in (("a", 90), ("b", 160)):
        for i in range(6):
            image = Image.fromarray(np.full((20, 20), value + i, dtype=np.uint8))
            save(image, root / cls / f"{i}.bmp", "BMP")  # BMP: same size for any content
    cache = tmp_path / "cache"
    first = load(root, cache)
    assert first.spec.extra["cache"] == "miss"
    cache_file = Path(first.spec.extra["cache_path"])
    assert cache_file.is_file() and cache_file.parent == cache
    assert [p.name for p in cache.iterdir() if p.suffix == ".tmp"] == []

    # New pixels under the same names, sizes and times: a hit returns the cached arrays,
    # which proves nothing was decoded.
    for path in sorted(root.rglob("*.bmp")):
        with Image.open(path) as image:
            darker = Image.fromarray(np.asarray(image) // 2)
        raw = tmp_path / "raw.bmp"
        darker.save(raw, "BMP")
        _touch_same_stat(path, raw.read_bytes())
    second = load(root, cache)
    assert second.spec.extra["cache"] == "hit"
    assert second.spec.extra["cache_path"] == str(cache_file)
    for a, b in zip(
        (first.train, first.val, first.test), (second.train, second.val, second.test), strict=True
    ):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)

    # Another size: a miss, decoding the new pixels.
    resized = load(root, cache, image_size=10)
    assert resized.spec.extra["cache"] == "miss"
    assert resized.train.images.shape[1:] == (1, 10, 10)
    assert resized.train.images.max() < 90
    # A file's modification time is part of the key.
    path = root / "a" / "0.bmp"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert load(root, cache).spec.extra["cache"] == "miss"
    # So are the channels and the crop.
    assert load(root, cache, channels=3).spec.extra["cache"] == "miss"
    assert load(root, cache, crop=True).spec.extra["cache"] == "miss"


def test_a_corrupt_cache_file_is_rebuilt(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_class_tree(root, {"a": 5, "b": 5})
    first = load(root, tmp_path / "cache")
    cache_file = Path(first.spec.extra["cache_path"])
    cache_file.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable cache file"):
        again = load(root, tmp_path / "cache")
    assert again.spec.extra["cache"] == "miss"
    np.testing.assert_array_equal(first.test.images, again.test.images)
    assert load(root, tmp_path / "cache").spec.extra["cache"] == "hit"


def test_an_unwritable_cache_still_loads(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_class_tree(root, {"a": 5, "b": 5})
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache folder would go")
    with pytest.warns(UserWarning, match="cannot write the decoded-image cache"):
        splits = load(root, blocker / "cache")
    assert splits.spec.extra["cache"] == "off"
    assert len(splits.train) + len(splits.val) + len(splits.test) == 10


def _load_in_child(root: Path, cache: Path, queue: multiprocessing.Queue[str]) -> None:
    splits = load(root, cache, image_size=32, crop=True)
    queue.put(splits.spec.extra["cache"])


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method"
)
def test_processes_starting_together_decode_once(tmp_path: Path) -> None:
    # Simulated hospitals load the data set at the same moment: the lock beside the cache
    # file makes one decode and the other wait for its cache file.
    root = tmp_path / "data"
    for cls in ("a", "b"):
        for i in range(150):
            save(bright_square("L", size=(160, 120)), root / cls / f"{i:03d}.png")
    context = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[str] = context.Queue()
    children = [
        context.Process(target=_load_in_child, args=(root, tmp_path / "cache", queue))
        for _ in range(2)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=120)
        assert child.exitcode == 0
    assert sorted(queue.get(timeout=5) for _ in children) == ["hit", "miss"]


def test_worker_processes_give_the_same_arrays(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for cls in ("a", "b"):
        for i in range(70):
            box = (5 + i % 7, 30, 4 + i % 5, 36)
            save(bright_square("RGB", box=box), root / cls / f"{i:02d}.jpg", "JPEG")
    serial = load(root, tmp_path / "serial", crop=True, channels=3, workers=1)
    pooled = load(root, tmp_path / "pooled", crop=True, channels=3, workers=2)
    for a, b in zip(
        (serial.train, serial.val, serial.test),
        (pooled.train, pooled.val, pooled.test),
        strict=True,
    ):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)


# ---------------------------------------------------------------------------
# brain-tumor-mri under other folder names, sizes and encoders
# ---------------------------------------------------------------------------

# Each class's synthetic brain has its own brightness, so every decoded image's label can
# be checked against its own pixels.
BRAIN_LEVELS = {"glioma": 80, "meningioma": 130, "notumor": 180, "pituitary": 230}

# (file name, (width, height), mode, Pillow format, save options): the sizes and encoder
# variants brain-tumour sets come in.
BRAIN_VARIANTS = [
    ("baseline-512.jpg", (512, 512), "L", "JPEG", {}),
    ("progressive.jpg", (300, 256), "RGB", "JPEG", {"progressive": True}),
    ("optimized.jpg", (64, 90), "RGB", "JPEG", {"optimize": True}),
    ("subsampling-444.jpg", (256, 300), "RGB", "JPEG", {"subsampling": 0, "quality": 95}),
    ("subsampling-420.jpg", (200, 150), "RGB", "JPEG", {"subsampling": 2, "quality": 60}),
    ("gray-progressive.JPEG", (90, 64), "L", "JPEG", {"progressive": True, "optimize": True}),
    ("cmyk.jpg", (120, 120), "CMYK", "JPEG", {}),
    ("gray.png", (100, 80), "L", "PNG", {}),
    ("rgb.png", (80, 100), "RGB", "PNG", {}),
]


def brain_image(cls: str, size: tuple[int, int] = (60, 50), mode: str = "L") -> Image.Image:
    """A black image (width, height) with a "brain" of the class's brightness filling the
    middle 60 % of each side."""
    width, height = size
    gray = np.zeros((height, width), dtype=np.uint8)
    gray[height // 5 : height - height // 5, width // 5 : width - width // 5] = BRAIN_LEVELS[cls]
    return Image.fromarray(gray).convert(mode)


def write_brain_folders(split_dir: Path, folders: dict[str, str], count: int) -> None:
    """``count`` small PNG brains in ``split_dir/<folder>`` for each folder -> class."""
    for folder, cls in folders.items():
        for i in range(count):
            save(brain_image(cls), split_dir / folder / f"{cls}-{i}.png")


@pytest.fixture
def brain_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The data root of ``--dataset brain-tumor-mri``, with the cache inside ``tmp_path``;
    the set goes in its ``brain-tumor-mri`` folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "data"


def load_brain(data_dir: Path, size: int = 24) -> Splits:
    return load_dataset("brain-tumor-mri", size, data_dir, download=False, progress=False)


def brain_error(data_dir: Path, start: str) -> str:
    """Loading fails with a one-line DataError that starts with ``start``; its message."""
    with pytest.raises(DataError) as error:
        load_brain(data_dir)
    message = str(error.value)
    assert "\n" not in message and message.startswith(start), message
    return message


def check_brain_labels(splits: Splits, size: int = 24) -> None:
    """Every image is (1, size, size), its centre at its class's brightness, and labelled
    with that class's canonical index."""
    levels = np.array([BRAIN_LEVELS[c] for c in BRAIN_CLASSES])
    mid = size // 2
    for part in (splits.train, splits.val, splits.test):
        assert part.images.shape[1:] == (1, size, size)
        assert part.images.dtype == np.uint8
        assert part.class_names == BRAIN_CLASSES
        centres = part.images[:, 0, mid - 2 : mid + 2, mid - 2 : mid + 2].mean(axis=(1, 2))
        nearest = np.abs(centres[:, None] - levels[None, :]).argmin(axis=1)
        np.testing.assert_array_equal(nearest, part.labels)
        np.testing.assert_allclose(centres, levels[part.labels], atol=12)


@pytest.mark.parametrize(
    ("folder", "expected"),
    [
        ("glioma", "glioma"),
        ("glioma_tumor", "glioma"),
        ("Glioma", "glioma"),
        ("GLIOMA-TUMOUR", "glioma"),
        ("meningioma_tumor", "meningioma"),
        ("meningioma_tumour", "meningioma"),
        ("Meningioma Tumors", "meningioma"),
        ("notumor", "notumor"),
        ("no_tumor", "notumor"),
        ("No Tumor", "notumor"),
        ("no-tumour", "notumor"),
        ("non-tumor", "notumor"),
        ("healthy", "notumor"),
        ("Normal", "notumor"),
        ("pituitary", "pituitary"),
        ("pituitary_tumor", "pituitary"),
        ("pituitary tumor", "pituitary"),
        ("Pituitary Adenoma", "pituitary"),
        ("2_pituitary", "pituitary"),
        ("tumor", None),
        ("yes", None),
        ("glioblastoma", None),
        ("astrocytoma_tumor", None),
        ("", None),
    ],
)
def test_brain_tumor_class_of_folder_names(folder: str, expected: str | None) -> None:
    assert brain_tumor_class(folder) == expected


def test_brain_tumor_sartaj_folder_names(brain_data: Path) -> None:
    # Sartaj Bhuvaji's Kaggle set (sartajbhuvaji/brain-tumor-classification-mri).
    root = brain_data / "brain-tumor-mri"
    sartaj = {f"{c}_tumor": c for c in ("glioma", "meningioma", "pituitary")}
    sartaj["no_tumor"] = "notumor"
    write_brain_folders(root / "Training", sartaj, 5)
    write_brain_folders(root / "Testing", sartaj, 2)
    splits = load_brain(brain_data)
    assert splits.spec.name == "brain-tumor-mri"
    assert splits.spec.class_names == BRAIN_CLASSES
    assert (splits.spec.task, splits.spec.in_channels, splits.spec.extra["crop"]) == (
        "multi-class",
        1,
        True,
    )
    assert splits.spec.extra["layout"] == "train-test"
    assert np.bincount(splits.test.labels).tolist() == [2, 2, 2, 2]
    assert np.bincount(splits.val.labels, minlength=4).tolist() == [1, 1, 1, 1]
    assert np.bincount(splits.train.labels).tolist() == [4, 4, 4, 4]
    check_brain_labels(splits)
    assert splits.spec.extra["cache"] == "miss"
    assert load_brain(brain_data).spec.extra["cache"] == "hit"
    # Another folder name is another listing: the cache key changes, the classes do not.
    (root / "Testing" / "no_tumor").rename(root / "Testing" / "notumor")
    renamed = load_brain(brain_data)
    assert renamed.spec.extra["cache"] == "miss"
    assert renamed.spec.class_names == BRAIN_CLASSES
    np.testing.assert_array_equal(renamed.test.labels, splits.test.labels)
    np.testing.assert_array_equal(renamed.test.images, splits.test.images)


def test_brain_tumor_mixed_spellings_keep_the_canonical_order(brain_data: Path) -> None:
    root = brain_data / "brain-tumor-mri"
    # Sorted as strings these are Meningioma, Pituitary, glioma, healthy: the labels must
    # still be glioma 0, meningioma 1, notumor 2, pituitary 3.
    training = {
        "Pituitary_Tumour": "pituitary",
        "glioma": "glioma",
        "healthy": "notumor",
        "Meningioma Tumor": "meningioma",
    }
    testing = {  # the test folder spells them differently again
        "GLIOMA-TUMOR": "glioma",
        "meningioma": "meningioma",
        "no-tumour": "notumor",
        "pituitary tumor": "pituitary",
    }
    write_brain_folders(root / "train", training, 4)
    write_brain_folders(root / "test", testing, 3)
    splits = load_brain(brain_data)
    assert splits.spec.class_names == BRAIN_CLASSES
    assert np.bincount(splits.test.labels).tolist() == [3, 3, 3, 3]
    assert len(splits.train) + len(splits.val) == 16
    check_brain_labels(splits)


def test_brain_tumor_without_train_test_folders_and_few_images(brain_data: Path) -> None:
    # Two or three images a class, no Training/Testing split: still loads, still labelled.
    root = brain_data / "brain-tumor-mri"
    write_brain_folders(root, {"glioma": "glioma", "no tumor": "notumor"}, 2)
    write_brain_folders(root, {"Meningioma": "meningioma", "pituitary": "pituitary"}, 3)
    splits = load_brain(brain_data, size=16)
    assert splits.spec.class_names == BRAIN_CLASSES
    assert splits.spec.extra["layout"] == "single-folder"
    assert len(splits.train) + len(splits.val) + len(splits.test) == 10
    assert min(len(splits.train), len(splits.val), len(splits.test)) >= 1
    everything = np.concatenate([splits.train.labels, splits.val.labels, splits.test.labels])
    assert np.bincount(everything).tolist() == [2, 3, 2, 3]
    check_brain_labels(splits, size=16)


def test_brain_tumor_unknown_folder_is_an_error(brain_data: Path) -> None:
    root = brain_data / "brain-tumor-mri"
    folders = {"glioma": "glioma", "meningioma": "meningioma", "notumor": "notumor"}
    write_brain_folders(root / "Training", {**folders, "pituitary": "pituitary"}, 2)
    save(brain_image("glioma"), root / "Training" / "astrocytoma" / "a.png")
    message = brain_error(brain_data, f"{(root / 'Training' / 'astrocytoma').resolve()}: ")
    assert "'astrocytoma' is none of the classes glioma, meningioma, notumor, pituitary" in message
    assert "expected folders named glioma, meningioma, notumor and pituitary" in message
    assert "glioma_tumor" in message and "healthy" in message
    # In the test folder too, even when the training folder is fine.
    shutil.rmtree(root / "Training" / "astrocytoma")
    write_brain_folders(root / "Testing", {**folders, "tumour": "pituitary"}, 1)
    with pytest.raises(DataError, match=r"Testing/tumour: class folder 'tumour' is none of"):
        load_brain(brain_data)


def test_brain_tumor_two_folders_of_one_class_is_an_error(brain_data: Path) -> None:
    root = brain_data / "brain-tumor-mri"
    write_brain_folders(
        root / "Training",
        {
            "glioma": "glioma",
            "meningioma": "meningioma",
            "no_tumor": "notumor",
            "healthy": "notumor",
            "pituitary": "pituitary",
        },
        2,
    )
    brain_error(
        brain_data,
        f"{(root / 'Training').resolve()}: class folders 'healthy' and 'no_tumor' are both "
        "class 'notumor'; expected one folder per class, named glioma, meningioma",
    )


def test_brain_tumor_missing_classes(brain_data: Path) -> None:
    root = brain_data / "brain-tumor-mri"
    three = {"glioma_tumor": "glioma", "meningioma_tumor": "meningioma", "no_tumor": "notumor"}
    write_brain_folders(root / "Training", {**three, "pituitary_tumor": "pituitary"}, 3)
    # A class missing from the test folder: loaded, with the generic loader's warning.
    write_brain_folders(root / "Testing", {"glioma": "glioma", "pituitary": "pituitary"}, 2)
    with pytest.warns(UserWarning, match=r"no test folder for class\(es\) meningioma, notumor"):
        splits = load_brain(brain_data)
    assert splits.spec.class_names == BRAIN_CLASSES
    assert np.bincount(splits.test.labels, minlength=4).tolist() == [2, 0, 0, 2]
    check_brain_labels(splits)
    # A class missing from the training folder: no training images of it, an error.
    shutil.rmtree(root / "Training" / "pituitary_tumor")
    brain_error(
        brain_data,
        f"{(root / 'Training').resolve()}: no class folder for pituitary "
        "(found glioma_tumor, meningioma_tumor, no_tumor); expected one folder per class",
    )


def test_brain_tumor_any_size_and_encoder(brain_data: Path) -> None:
    root = brain_data / "brain-tumor-mri"
    for cls in BRAIN_CLASSES:
        for file_name, size, mode, fmt, options in BRAIN_VARIANTS:
            save(brain_image(cls, size, mode), root / "Training" / cls / file_name, fmt, **options)
        for file_name, size, mode, fmt, options in BRAIN_VARIANTS[::4]:
            save(brain_image(cls, size, mode), root / "Testing" / cls / file_name, fmt, **options)
    # The files are what their names say, so the test covers every variant.
    sample = root / "Training" / "glioma"
    for file_name, size, mode, fmt, options in BRAIN_VARIANTS:
        with Image.open(sample / file_name) as image:
            assert (image.format, image.size, image.mode) == (fmt, size, mode)
            if fmt == "JPEG":
                assert bool(image.info.get("progressive")) == bool(options.get("progressive"))
                if mode == "RGB":  # Pillow's default is 4:2:0 (2); 4:4:4 is 0
                    expected = options.get("subsampling", 2)
                    assert JpegImagePlugin.get_sampling(image) == expected
    splits = load_brain(brain_data)
    assert splits.spec.extra["skipped_files"] == []
    assert len(splits.train) + len(splits.val) == 4 * len(BRAIN_VARIANTS)
    assert np.bincount(splits.test.labels).tolist() == [3, 3, 3, 3]
    check_brain_labels(splits)


# ---------------------------------------------------------------------------
# The real Brain Tumor MRI data set
# ---------------------------------------------------------------------------


@pytest.mark.realdata
def test_brain_tumor_mri(tmp_path: Path) -> None:
    if not (BRAIN_TUMOR / "Training").is_dir():
        pytest.skip(f"Brain Tumor MRI data set not found at {BRAIN_TUMOR}")
    start = time.perf_counter()
    splits = load_folder_dataset(
        BRAIN_TUMOR,
        name="brain-tumor-mri",
        image_size=32,
        channels=1,
        cache_dir=tmp_path,
        progress=False,
    )
    decode_seconds = time.perf_counter() - start
    spec = splits.spec
    assert spec.class_names == BRAIN_CLASSES
    assert spec.task == "multi-class" and spec.in_channels == 1 and spec.image_size == 32
    assert spec.extra["layout"] == "train-test"
    assert spec.extra["cache"] == "miss"
    assert spec.extra["skipped_files"] == []
    assert len(splits.train) + len(splits.val) == 5712
    assert len(splits.test) == 1311
    assert np.bincount(splits.test.labels).tolist() == [300, 306, 405, 300]
    train_counts = np.bincount(np.concatenate([splits.train.labels, splits.val.labels]))
    assert train_counts.tolist() == [1321, 1339, 1595, 1457]
    assert np.bincount(splits.val.labels).tolist() == [132, 134, 160, 146]
    assert splits.train.images.shape == (5140, 1, 32, 32)
    # Cropped brains fill the frame: few black pixels on average.
    assert splits.test.images.mean() > 40

    start = time.perf_counter()
    again = load_folder_dataset(
        BRAIN_TUMOR,
        name="brain-tumor-mri",
        image_size=32,
        channels=1,
        cache_dir=tmp_path,
        progress=False,
    )
    hit_seconds = time.perf_counter() - start
    assert again.spec.extra["cache"] == "hit"
    np.testing.assert_array_equal(again.test.images, splits.test.images)
    np.testing.assert_array_equal(again.val.labels, splits.val.labels)
    print(f"brain-tumor-mri at 32 px: decode {decode_seconds:.1f} s, cache hit {hit_seconds:.2f} s")


@pytest.mark.slow
def test_federated_run_on_a_subset_of_brain_tumor_mri(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end on real MRI JPEGs: 20 training and 8 test images per class (the real
    files, in the real layout) through `folder:PATH`, two hospitals, one round."""
    if not (BRAIN_TUMOR / "Training").is_dir():
        pytest.skip(f"Brain Tumor MRI data set not found at {BRAIN_TUMOR}")
    import csv
    import json
    import shutil

    from medbloom.config import ExperimentConfig
    from medbloom.experiment import prepare_run
    from medbloom.federation.simulation import run_simulation

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    subset = tmp_path / "bt-subset"
    for split, n in (("Training", 20), ("Testing", 8)):
        for name in BRAIN_CLASSES:
            (subset / split / name).mkdir(parents=True)
            for f in sorted((BRAIN_TUMOR / split / name).iterdir())[:n]:
                shutil.copy(f, subset / split / name / f.name)
    cfg = ExperimentConfig(
        dataset=f"folder:{subset}",
        num_clients=2,
        rounds=1,
        partition="iid",
        min_partition_size=5,
        out=str(tmp_path / "run"),
    )
    run_dir = prepare_run(cfg)
    run_simulation(cfg, run_dir)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["rounds_completed"] == 1
    config = json.loads((run_dir / "config.json").read_text())["config"]
    assert config["dataset"] == f"folder:{subset}" and config["size"] == 64
    with (run_dir / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["round"] for r in rows] == ["0", "1"] and rows[1]["clients_ok"] == "2"
    report = json.loads((run_dir / "per_class.jsonl").read_text().splitlines()[-1])
    assert tuple(report["class_names"]) == BRAIN_CLASSES
    assert np.array(report["confusion_matrix"]).sum() == 4 * 8  # every test image scored


def test_a_file_name_that_is_not_utf8_loads(tmp_path: Path) -> None:
    """Linux file names are bytes: b"\\xff\\xfe bad.png" reaches Python with lone
    surrogates, which the cache key and the cache's file list must carry."""
    root = tmp_path / "data"
    write_class_tree(root / "Training", {"a": 10, "b": 10})
    write_class_tree(root / "Testing", {"a": 3, "b": 3})
    name = os.fsdecode(b"\xff\xfe bad.png")
    image = Image.fromarray(np.full((12, 12), 250, dtype=np.uint8))
    save(image, root / "Training" / "a" / name)
    splits = load(root, tmp_path / "cache")
    assert len(splits.train) + len(splits.val) == 21
    assert 250 in pixel_ids(np.concatenate([splits.train.images, splits.val.images]))
    files = splits.spec.extra["files"]
    assert f"Training/a/{name}" in files["train"] + files["val"]
    again = load(root, tmp_path / "cache")  # the cache, with that name in it, reads back
    assert again.spec.extra["cache"] == "hit"
    assert again.spec.extra["files"] == files
