"""``make_augmenter``: what "light" does to batches of 2D images and 3D volumes, and one
federated run with augmentation on a small class-folder data set."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medbloom.augment import make_augmenter
from medbloom.config import ExperimentConfig
from medbloom.data.medmnist import spec_for
from medbloom.experiment import prepare_run
from medbloom.models import build_model
from medbloom.training import to_tensor, train_local

Aug = Callable[[torch.Tensor], torch.Tensor]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread, as medbloom's clients use (see test_models)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _light(dims: int = 2, **kwargs: bool) -> Aug:
    aug = make_augmenter("light", dims, **kwargs)
    assert aug is not None
    return aug


def _images(n: int, channels: int, size: int, dims: int = 2, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    shape = (n, channels) + (size,) * dims
    return to_tensor(rng.integers(0, 256, shape, dtype=np.uint8))


def _left_bright(n: int, size: int, dims: int = 2) -> torch.Tensor:
    """Images (or volumes) white in the left half of the last axis, black elsewhere."""
    x = -torch.ones((n, 1) + (size,) * dims)
    x[..., : size // 2] = 1.0
    return x


def test_none_is_no_augmentation() -> None:
    assert make_augmenter("none", 2) is None
    assert make_augmenter("none", 3) is None


@pytest.mark.parametrize(("kind", "dims"), [("heavy", 2), ("light", 1), ("light", 4)])
def test_unknown_kind_or_dims_is_an_error(kind: str, dims: int) -> None:
    with pytest.raises(ValueError, match=kind if kind == "heavy" else "spatial_dims"):
        make_augmenter(kind, dims)


def test_wrong_batch_shape_is_an_error() -> None:
    with pytest.raises(ValueError, match="dimensions"):
        _light(2)(torch.zeros(1, 28, 28))


@pytest.mark.parametrize(
    ("channels", "size", "dims", "dtype"),
    [(1, 28, 2, torch.float32), (3, 64, 2, torch.float32), (1, 28, 2, torch.float64),
     (1, 16, 3, torch.float32)],
    ids=["gray28", "rgb64", "float64", "3d16"],
)  # fmt: skip
def test_keeps_shape_dtype_device_and_range(
    channels: int, size: int, dims: int, dtype: torch.dtype
) -> None:
    x = _images(8, channels, size, dims).to(dtype)
    before = x.clone()
    torch.manual_seed(0)
    y = _light(dims)(x)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    assert torch.equal(x, before), "the input batch must not be changed in place"
    assert torch.isfinite(y).all()
    assert y.min() >= -1.0 and y.max() <= 1.0
    assert not torch.equal(y, x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_runs_on_the_inputs_device() -> None:
    x = _images(4, 1, 28).cuda()
    y = _light(2)(x)
    assert y.device == x.device and y.shape == x.shape


def test_empty_batch_passes_through() -> None:
    x = torch.zeros(0, 1, 28, 28)
    assert _light(2)(x).shape == (0, 1, 28, 28)


@pytest.mark.parametrize("dims", [2, 3])
def test_same_seed_same_transforms(dims: int) -> None:
    aug = _light(dims)
    x = _images(6, 1, 16, dims)
    torch.manual_seed(5)
    a = aug(x)
    torch.manual_seed(5)
    b = aug(x)
    torch.manual_seed(6)
    c = aug(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("dims", [2, 3])
def test_flips_left_right_about_half_the_time(dims: int) -> None:
    n, size = 64, 16
    x = _left_bright(n, size, dims)
    torch.manual_seed(0)
    y = _light(dims)(x)
    half = size // 2
    left = y[..., :half].mean(dim=tuple(range(1, y.dim())))
    right = y[..., half:].mean(dim=tuple(range(1, y.dim())))
    flipped = int((right > left).sum())
    assert 16 <= flipped <= 48
    torch.manual_seed(0)
    y = _light(dims, flip=False)(x)
    assert (y[..., :half].mean(dim=tuple(range(1, y.dim()))) > 0).all()
    # up and down are never swapped: a top-bright image stays top-bright
    if dims == 2:
        top = -torch.ones(n, 1, size, size)
        top[:, :, : size // 2] = 1.0
        y = _light(2)(top)
        assert (y[:, :, :half].mean(dim=(1, 2, 3)) > y[:, :, half:].mean(dim=(1, 2, 3))).all()


@pytest.mark.parametrize("dims", [2, 3])
def test_flip_mirrors_left_right_and_does_nothing_else(dims: int) -> None:
    x = _images(64, 1, 8, dims, seed=3)
    torch.manual_seed(0)
    aug = make_augmenter("flip", dims)
    assert aug is not None
    y = aug(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    same = (y == x).flatten(1).all(dim=1)
    mirrored = (y == x.flip(-1)).flatten(1).all(dim=1)
    assert bool((same | mirrored).all()), "each image is itself or its mirror, exactly"
    assert 16 <= int(mirrored.sum()) <= 48  # p = 1/2 of 64
    torch.manual_seed(0)
    assert torch.equal(aug(x), y)  # the same seed, the same flips
    assert make_augmenter("flip", dims, flip=False) is None  # sided labels: nothing to do


def test_affine_moves_a_dot_by_at_most_the_translation_and_scale() -> None:
    """A bright dot at the centre stays within 5 % translation (plus 10 % scale and the
    rotation, which move the centre of the image not at all) of the centre."""
    n, size = 64, 64
    x = -torch.ones(n, 1, size, size)
    x[:, :, 30:34, 30:34] = 1.0
    torch.manual_seed(0)
    y = (_light(2, flip=False)(x) + 1) / 2  # [0, 1]: weights for the centroid
    grid = torch.arange(size, dtype=torch.float32)
    mass = y.sum(dim=(1, 2, 3))
    cy = (y.sum(dim=3).squeeze(1) * grid).sum(dim=1) / mass
    cx = (y.sum(dim=2).squeeze(1) * grid).sum(dim=1) / mass
    centre = (size - 1) / 2
    assert ((cx - centre).abs() <= 0.05 * size + 0.5).all()
    assert ((cy - centre).abs() <= 0.05 * size + 0.5).all()
    assert (cx - centre).abs().max() > 0.5, "the dot never moved"


def test_brightness_and_contrast_within_ten_percent() -> None:
    """A uniform mid-gray image has no geometry to change; only brightness moves it,
    by a factor in [0.9, 1.1]; contrast blends with its own mean: no change."""
    n = 64
    x = torch.zeros(n, 1, 16, 16)  # 0.5 in [0, 1]
    torch.manual_seed(0)
    y = _light(2)(x)
    values = y.flatten(1)
    assert torch.allclose(values, values[:, :1].expand_as(values), atol=1e-5)
    unit = (values[:, 0] + 1) / 2
    assert (unit >= 0.5 * 0.9 - 1e-5).all() and (unit <= 0.5 * 1.1 + 1e-5).all()
    assert unit.std() > 0.005


def test_structure_survives_light_augmentation() -> None:
    """Light means light: each augmented image still correlates strongly with its source
    (or its mirror image)."""
    size = 32
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    blob = torch.exp(-((xx - 12.0) ** 2 + (yy - 18.0) ** 2) / 40.0)
    x = (blob * 2 - 1).expand(16, 1, size, size).clone()
    torch.manual_seed(0)
    y = _light(2)(x)

    def corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a = a.flatten(1) - a.flatten(1).mean(1, keepdim=True)
        b = b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))

    best = torch.maximum(corr(y, x), corr(y, x.flip(-1)))
    assert (best > 0.75).all()


def test_local_training_with_augmentation() -> None:
    spec = spec_for("bloodmnist", 28)
    torch.manual_seed(0)
    model = build_model("cnn", spec)
    x = _images(16, 3, 28)
    y = torch.from_numpy(np.random.default_rng(0).integers(0, 8, 16))
    result = train_local(model, x, y, task=spec.task, epochs=1, batch_size=8, augment=_light(2))
    assert np.isfinite(result.train_loss) and result.steps == 2


# --------------------------------------------------------------------- end to end
PATTERNS = ("stripes", "bars", "disk")


def _pattern(kind: str, rng: np.random.Generator, size: int = 48) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    period = int(rng.integers(6, 10))
    if kind == "stripes":  # horizontal stripes
        img = (yy // (period // 2)) % 2
    elif kind == "bars":  # vertical bars
        img = (xx // (period // 2)) % 2
    else:  # a bright disk
        cy, cx = rng.integers(18, 30, size=2)
        img = ((yy - cy) ** 2 + (xx - cx) ** 2 < int(rng.integers(80, 150))).astype(int)
    noisy = img * 200 + 30 + rng.normal(0, 15, (size, size))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def write_class_folders(root: Path, per_class: int = 20, seed: int = 0) -> Path:
    """``root/<class>/<i>.png``: gray 48x48 PNGs, one pattern per class."""
    rng = np.random.default_rng(seed)
    for kind in PATTERNS:
        (root / kind).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(_pattern(kind, rng), mode="L").save(root / kind / f"{i:02d}.png")
    return root


@pytest.mark.slow
def test_federated_run_with_light_augmentation_on_a_class_folder_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medbloom.federation.simulation import run_simulation

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # decoded-image cache
    data = write_class_folders(tmp_path / "patterns")
    (data / "disk" / "broken.png").write_bytes(b"not an image")  # skipped, and counted
    cfg = ExperimentConfig(
        dataset=f"folder:{data}",
        size=32,
        num_clients=2,
        rounds=2,
        model="cnn",
        augment="light",
        local_epochs=1,
        min_partition_size=5,
        min_clients=1,
        out=str(tmp_path / "run"),
    )
    run_dir = prepare_run(cfg)
    run_simulation(cfg, run_dir)

    with (run_dir / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    for r in rows[1:]:  # both hospitals trained with augmentation, none failed
        assert (int(r["clients_ok"]), int(r["clients_failed"])) == (2, 0)
    lines = (run_dir / "per_class.jsonl").read_text().splitlines()
    assert lines
    for line in lines:
        report = json.loads(line)
        assert report["class_names"] == sorted(PATTERNS)
        matrix = np.array(report["confusion_matrix"])
        assert matrix.shape == (3, 3)
        assert matrix.sum() == sum(report["support"]) > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["rounds_completed"] == 2
    assert summary["skipped_files"] == ["disk/broken.png"]
