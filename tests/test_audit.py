"""The duplicate audit: perceptual hashes, the multi-index search, the audit's counts,
the clean test split, de-duplication, and `medbloom data audit` on real files."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medbloom.data.audit import (
    DEFAULT_THRESHOLD,
    audit_images,
    dedup_mask,
    exact_pairs,
    hamming,
    near_pairs,
    perceptual_hashes,
    pixel_digests,
)
from medbloom.errors import ConfigError

SIZE = 64


def phantom(seed: int, size: int = SIZE) -> np.ndarray:
    """A smooth grey image with a few bright and dark blobs: structure a perceptual hash
    sees, unlike pixel noise. ``(1, S, S)`` uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    # no flat background: where neighbours tie, JPEG noise alone would decide a bit
    fx, fy, phase = rng.uniform(2, 5), rng.uniform(2, 5), rng.uniform(0, 6.3)
    img = 90.0 + 35 * np.sin(2 * np.pi * (fx * xx + fy * yy * 0.5) + phase)
    for _ in range(6):
        cy, cx = rng.uniform(0.15, 0.85, 2)
        r = rng.uniform(0.05, 0.25)
        img += rng.uniform(-80, 150) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    return np.clip(img, 0, 255).astype(np.uint8)[None]


def jpeg_again(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img[0]).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))[None]


def resized(img: np.ndarray, via: int) -> np.ndarray:
    small = Image.fromarray(img[0]).resize((via, via), Image.Resampling.BICUBIC)
    return np.asarray(small.resize((SIZE, SIZE), Image.Resampling.BICUBIC))[None]


def brighter(img: np.ndarray, by: int) -> np.ndarray:
    return np.clip(img.astype(np.int16) + by, 0, 255).astype(np.uint8)


def rewindowed(img: np.ndarray, low: int, high: int) -> np.ndarray:
    """Another display window: [low, high] stretched to [0, 255], clipped."""
    x = (img.astype(np.float32) - low) * 255.0 / (high - low)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


TRANSFORMS = {
    "jpeg quality 40": lambda im: jpeg_again(im, 40),
    "jpeg quality 90": lambda im: jpeg_again(im, 90),
    "resized via 40 px": lambda im: resized(im, 40),
    "resized via 100 px": lambda im: resized(im, 100),
    "brightness +25": lambda im: brighter(im, 25),
    "brightness -20": lambda im: brighter(im, -20),
    "re-windowed 20-230": lambda im: rewindowed(im, 20, 230),
    "re-windowed 40-255": lambda im: rewindowed(im, 40, 255),
}


def _distance(a: np.ndarray, b: np.ndarray) -> int:
    h = perceptual_hashes(np.stack([a, b]))
    return int(hamming(h[0], h[1]))


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_a_transformed_copy_is_a_near_twin(name: str) -> None:
    for seed in range(5):
        img = phantom(seed)
        copy = TRANSFORMS[name](img)
        assert not np.array_equal(copy, img)
        assert _distance(img, copy) <= DEFAULT_THRESHOLD, (name, seed)


def test_different_images_are_not_twins() -> None:
    images = np.stack([phantom(s) for s in range(40)])
    i, j, d = near_pairs(perceptual_hashes(images), DEFAULT_THRESHOLD)
    assert len(i) == 0, list(zip(i, j, d, strict=True))
    # and they are far apart, not just past the threshold
    h = perceptual_hashes(images)
    far = [int(hamming(h[a], h[b])) for a in range(40) for b in range(a + 1, 40)]
    assert np.median(far) > 3 * DEFAULT_THRESHOLD


def _brute(hashes: np.ndarray, t: int) -> set[tuple[int, int]]:
    n = len(hashes)
    d = np.zeros((n, n), dtype=np.int32)
    for k in range(hashes.shape[1]):
        d += np.bitwise_count(hashes[:, None, k] ^ hashes[None, :, k]).astype(np.int32)
    a, b = np.nonzero(np.triu(d <= t, k=1))
    return set(zip(a.tolist(), b.tolist(), strict=True))


@pytest.mark.parametrize("threshold", [0, 1, 3, 8, 16, 40])
def test_near_pairs_finds_exactly_the_brute_force_pairs(threshold: int) -> None:
    rng = np.random.default_rng(threshold)
    base = rng.integers(0, 2**63, size=(300, 4), dtype=np.uint64)
    # plant copies with a few flipped bits, some several times (groups), some exact
    copies = []
    for _ in range(150):
        h = base[rng.integers(0, 300)].copy()
        for _ in range(int(rng.integers(0, 2 * threshold + 3))):
            bit = int(rng.integers(0, 256))
            h[bit // 64] ^= np.uint64(1) << np.uint64(bit % 64)
        copies.append(h)
    hashes = np.concatenate([base, np.stack(copies)])
    hashes = hashes[rng.permutation(len(hashes))]
    i, j, d = near_pairs(hashes, threshold)
    found = set(zip(i.tolist(), j.tolist(), strict=True))
    assert found == _brute(hashes, threshold)
    assert len(found) > 0
    assert (i < j).all() and (d <= threshold).all()
    assert (d == hamming(hashes[i], hashes[j])).all()


def test_exact_pairs_are_identical_pixels_only() -> None:
    imgs = np.stack([phantom(s) for s in range(6)])
    dup = np.concatenate([imgs, imgs[[1, 1, 4]], brighter(imgs[[2]], 1)])
    i, j = exact_pairs(pixel_digests(dup))
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == {
        (1, 6),
        (1, 7),
        (6, 7),
        (4, 8),
    }


def test_threshold_out_of_range_is_a_config_error() -> None:
    h = np.zeros((2, 4), dtype=np.uint64)
    for bad in (-1, 65, 2.5):
        with pytest.raises(ConfigError):
            near_pairs(h, bad)  # type: ignore[arg-type]


# ------------------------------------------------------------- the audit


def _planted() -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """train 10, val 4, test 8 phantoms with known twins:

    - test 0: exact copy of train 2; test 1: JPEG copy of train 3; test 2: re-windowed
      copy of val 1; test 3: brighter copy of train 5 *with another label*;
    - train 7 and train 8 are JPEG copies of train 6; train 9 is a copy of val 0;
    - test 4..7 and the rest are distinct.
    """
    train = [phantom(s) for s in range(10)]
    val = [phantom(100 + s) for s in range(4)]
    train[7] = jpeg_again(train[6], 60)
    train[8] = jpeg_again(train[6], 35)
    train[9] = val[0].copy()
    test = [phantom(200 + s) for s in range(8)]
    test[0] = train[2].copy()
    test[1] = jpeg_again(train[3], 50)
    test[2] = rewindowed(val[1], 20, 230)
    test[3] = brighter(train[5], 15)
    images = np.stack(train + val + test)
    labels = np.array([s % 2 for s in range(22)], dtype=np.int64)
    labels[14 + 3] = 1 - labels[5]  # test 3 carries the other label than its twin
    labels[14 + 0] = labels[2]
    labels[14 + 1] = labels[3]
    labels[14 + 2] = labels[10 + 1]
    labels[7] = labels[8] = labels[6]
    labels[9] = labels[10]
    return images, labels, {"train": 10, "val": 4, "test": 8}


def test_audit_counts_the_planted_twins() -> None:
    images, labels, sizes = _planted()
    audit = audit_images(images, labels, sizes, ("a", "b"))
    s = audit.summary()
    assert s["by_split"]["train-test"]["pairs"] == 3
    assert s["by_split"]["train-test"]["exact"] == 1
    assert s["by_split"]["val-test"]["pairs"] == 1
    assert s["by_split"]["train-train"]["pairs"] == 3  # 6, 7 and 8 pairwise
    assert s["by_split"]["train-val"] == {
        "pairs": 1,
        "exact": 1,
        "near": 0,
        "different_labels": 0,
    }
    assert s["by_split"]["val-val"]["pairs"] == s["by_split"]["test-test"]["pairs"] == 0
    assert s["pairs_with_different_labels"] == 1
    assert s["test_with_train_twin"] == 4 and s["test_with_exact_train_twin"] == 1
    assert list(np.flatnonzero(audit.test_twins())) == [0, 1, 2, 3]
    # the clean split is exactly the test split minus the flagged images
    assert list(audit.clean_test_indices()) == [4, 5, 6, 7]
    assert s["test_clean"] == 4
    pairs = audit.to_json()["pairs"]
    mixed = [p for p in pairs if p["different_labels"]]
    assert len(mixed) == 1
    assert (mixed[0]["split_a"], mixed[0]["index_a"]) == ("train", 5)
    assert (mixed[0]["split_b"], mixed[0]["index_b"]) == ("test", 3)


def test_dedup_keeps_one_of_each_group_and_drops_twins_of_validation() -> None:
    images, labels, sizes = _planted()
    audit = audit_images(images, labels, sizes, ("a", "b"))
    assert dedup_mask(audit, "none").all()
    near = dedup_mask(audit, "near")
    # 7 and 8 (copies of 6) go, 9 (a copy of val 0) goes; the others stay
    assert list(np.flatnonzero(~near)) == [7, 8, 9]
    exact = dedup_mask(audit, "exact")
    assert list(np.flatnonzero(~exact)) == [9]  # JPEG copies are not exact
    with pytest.raises(ConfigError):
        dedup_mask(audit, "all")


def test_dedup_leaves_no_twins_among_the_kept_images() -> None:
    rng = np.random.default_rng(3)
    base = [phantom(s) for s in range(12)]
    # chains: each image a slightly brighter copy of the previous one
    train = [brighter(base[k % 12], int(rng.integers(-12, 12))) for k in range(40)]
    images = np.stack([*train, phantom(500), phantom(501)])
    labels = np.zeros(len(images), dtype=np.int64)
    audit = audit_images(images, labels, {"train": 40, "val": 1, "test": 1}, ("a",))
    keep = np.flatnonzero(dedup_mask(audit, "near"))
    i, _, _ = near_pairs(perceptual_hashes(images[keep]), audit.threshold)
    assert len(i) == 0
    assert 1 <= len(keep) <= 12


def _write_folder_set(root: Path) -> None:
    """Training/ and Testing/ JPEG folders with twins saved at other qualities."""
    for split, cls, seeds in (
        ("Training", "cats", range(0, 8)),
        ("Training", "dogs", range(10, 18)),
        ("Testing", "cats", range(30, 33)),
        ("Testing", "dogs", range(40, 43)),
    ):
        folder = root / split / cls
        folder.mkdir(parents=True)
        for s in seeds:
            Image.fromarray(phantom(s, 96)[0]).save(folder / f"{s}.jpg", quality=92)
    # twins in the test folder: a cat re-saved at quality 40, a dog filed as a cat
    Image.open(root / "Training" / "cats" / "3.jpg").save(
        root / "Testing" / "cats" / "copy-of-3.jpg", quality=40
    )
    Image.open(root / "Training" / "dogs" / "12.jpg").save(
        root / "Testing" / "cats" / "dog-12.jpg", quality=70
    )


def _medbloom(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medbloom", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "XDG_CACHE_HOME": str(cwd / "cache")},
    )


def test_audit_command_on_a_folder_set(tmp_path: Path) -> None:
    root = tmp_path / "set"
    _write_folder_set(root)
    out = tmp_path / "audit"
    done = _medbloom("data", "audit", f"folder:{root}", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "split pair" in done.stdout and "different labels" in done.stdout
    assert "test images with a twin in training" in done.stdout
    record = json.loads((out / "audit.json").read_text())
    s = record["summary"]
    assert s["test_with_train_twin"] == 2
    assert s["pairs_with_different_labels"] == 1
    files = {
        (p["file_a"], p["file_b"]): p
        for p in record["pairs"]
        if {p["split_a"], p["split_b"]} != {"train"} and "test" in (p["split_a"], p["split_b"])
    }
    assert set(files) == {
        ("Training/cats/3.jpg", "Testing/cats/copy-of-3.jpg"),
        ("Training/dogs/12.jpg", "Testing/cats/dog-12.jpg"),
    }
    mixed = files[("Training/dogs/12.jpg", "Testing/cats/dog-12.jpg")]
    assert mixed["different_labels"] and mixed["label_a"] == "dogs"
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.format == "PNG" and sheet.width > 500


@pytest.mark.parametrize(
    "args, message",
    [
        (["no-such-set"], "is unknown"),
        (["pneumoniamnist", "--dup-threshold", "65"], "out of range"),
        (["pneumoniamnist", "--dup-threshold", "-1"], "out of range"),
    ],
)
def test_audit_command_refuses_bad_input_in_one_line(
    tmp_path: Path, args: list[str], message: str
) -> None:
    done = _medbloom("data", "audit", *args, "--out", str(tmp_path / "a"), cwd=tmp_path)
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()


def test_audit_command_on_real_pneumoniamnist(tmp_path: Path, shared_data_root: Path) -> None:
    out = tmp_path / "audit"
    done = _medbloom(
        "data", "audit", "pneumoniamnist", "--data-dir", str(shared_data_root), "--out",
        str(out), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    s = json.loads((out / "audit.json").read_text())["summary"]
    # PneumoniaMNIST's official file: a few exact copies inside train and across
    # train/val (found here), none between the training and the test images
    assert s["images"] == {"train": 4708, "val": 524, "test": 624}
    assert s["test_with_train_twin"] == 0
    assert s["by_split"]["train-train"]["exact"] > 0
    assert s["pairs_with_different_labels"] == 0
