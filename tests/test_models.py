"""Conformance suite: every registered model on every kind of data set spec.

Each model in ``medbloom.models.MODELS`` is built for 2D gray, 2D colour, multi-label,
3D and 64-pixel specs and checked for output shape, finite outputs and gradients,
a lossless ``state_arrays``/``load_arrays`` round trip, and seeded reproducibility.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from medbloom.data.medmnist import spec_for
from medbloom.data.types import DatasetSpec
from medbloom.errors import ConfigError
from medbloom.metrics import MULTI_LABEL
from medbloom.models import MODELS, build_model, default_model, resolve_model
from medbloom.models.cnn import SmallCNN
from medbloom.models.resnet import ResNet
from medbloom.training import load_arrays, loss_function, state_arrays, to_tensor

# (flag, size, channels, outputs, spatial dims): what each spec must say about itself.
SPECS = {
    "pneumonia28": ("pneumoniamnist", 28, 1, 2, 2),
    "blood28": ("bloodmnist", 28, 3, 8, 2),
    "chest28-multilabel": ("chestmnist", 28, 1, 14, 2),
    "organ3d28": ("organmnist3d", 28, 1, 11, 3),
    "pneumonia64": ("pneumoniamnist", 64, 1, 2, 2),
}
BATCH = 2  # small: resnet50 and the 3D sets dominate the runtime of this file
SLOW = {
    ("resnet50", "organ3d28"): "too slow for the unit suite (about 6 s per forward/backward "
    "pass on one CPU thread); its layers are covered by resnet18-organ3d28 and resnet50-2D",
    ("vgg16", "chest28-multilabel"): "VGG-16 (138M parameters) takes about 1 s to build; "
    "multi-label only changes the loss, covered by vgg16 on the other 2D specs",
}
# Combinations a model does not support: build_model raises ConfigError for them.
UNSUPPORTED = {
    ("vgg16", "organ3d28"): "VGG-16 is 2D only (build_model raises ConfigError for 3D specs)",
    ("scatternet", "organ3d28"): "ScatterNet is 2D only (build_model raises ConfigError)",
}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread, as medbloom's clients use: on a busy machine two threads spin
    against each other and make these small forward passes many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cases(skip_slow: bool) -> list[object]:
    out = []
    for model in MODELS:
        for spec_id in SPECS:
            marks = []
            if (model, spec_id) in UNSUPPORTED:
                marks.append(pytest.mark.skip(reason=UNSUPPORTED[model, spec_id]))
            elif skip_slow and (model, spec_id) in SLOW:
                marks.append(pytest.mark.skip(reason=SLOW[model, spec_id]))
            out.append(pytest.param(model, spec_id, id=f"{model}-{spec_id}", marks=marks))
    return out


def _spec(spec_id: str) -> DatasetSpec:
    flag, size, *_ = SPECS[spec_id]
    return spec_for(flag, size)


def _batch(spec: DatasetSpec, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch as the data pipeline produces it: uint8 pixels through ``to_tensor``."""
    rng = np.random.default_rng(seed)
    shape = (BATCH, spec.in_channels) + (spec.image_size,) * spec.spatial_dims
    x = to_tensor(rng.integers(0, 256, size=shape, dtype=np.uint8))
    if spec.task == MULTI_LABEL:
        y = torch.from_numpy(rng.integers(0, 2, size=(BATCH, spec.num_classes))).float()
    else:
        y = torch.from_numpy(rng.integers(0, spec.num_classes, size=BATCH)).long()
    return x, y


def _build(name: str, spec: DatasetSpec, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, spec)


def test_registry_holds_the_documented_models() -> None:
    assert set(MODELS) == {"cnn", "resnet10", "resnet18", "resnet50", "vgg16", "scatternet"}
    for name, entry in MODELS.items():
        assert entry.name == name
        assert entry.description


@pytest.mark.parametrize("spec_id", list(SPECS))
def test_specs_describe_their_data_sets(spec_id: str) -> None:
    _, size, channels, outputs, dims = SPECS[spec_id]
    spec = _spec(spec_id)
    assert (spec.in_channels, spec.num_classes, spec.spatial_dims, spec.image_size) == (
        channels,
        outputs,
        dims,
        size,
    )
    assert (spec.task == MULTI_LABEL) == (spec_id == "chest28-multilabel")


@pytest.mark.parametrize(("name", "spec_id"), _cases(skip_slow=True))
def test_forward_and_backward(name: str, spec_id: str) -> None:
    spec = _spec(spec_id)
    model = _build(name, spec, seed=0).train()
    x, y = _batch(spec)
    out = model(x)
    assert out.shape == (BATCH, spec.num_classes)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    loss = loss_function(spec.task)(out, y)
    assert torch.isfinite(loss)
    loss.backward()
    params = dict(model.named_parameters())
    assert params
    no_grad = [k for k, p in params.items() if p.grad is None]
    assert not no_grad, f"parameters without a gradient: {no_grad}"
    bad = [k for k, p in params.items() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"
    assert any(p.grad.abs().sum() > 0 for p in params.values())


@pytest.mark.parametrize(("name", "spec_id"), _cases(skip_slow=True))
def test_state_arrays_round_trip_gives_identical_outputs(name: str, spec_id: str) -> None:
    spec = _spec(spec_id)
    source = _build(name, spec, seed=1)
    target = _build(name, spec, seed=2)
    # Give every floating buffer (BatchNorm statistics) non-default values, so the round
    # trip is checked for buffers as well as parameters. Buffers left out of the state
    # dict (ScatterNet's fixed filters) are the same in every copy and are left alone.
    persistent = set(source.state_dict())
    with torch.no_grad():
        for name, buf in source.named_buffers():
            if name in persistent and buf.is_floating_point():
                buf.uniform_(0.5, 1.5)
    arrays = state_arrays(source)
    expected_keys = {k for k in source.state_dict() if not k.endswith("num_batches_tracked")}
    assert set(arrays) == expected_keys
    assert all(v.device.type == "cpu" for v in arrays.values())
    target_state = target.state_dict()
    assert any(not torch.equal(arrays[k], target_state[k]) for k in arrays)

    load_arrays(target, arrays)
    for k, v in target.state_dict().items():
        if k in arrays:
            assert torch.equal(v, arrays[k]), k
    x, _ = _batch(spec, seed=3)
    source.eval()
    target.eval()
    with torch.no_grad():
        a, b = source(x), target(x)
    assert a.shape == (BATCH, spec.num_classes)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)


@pytest.mark.parametrize(("name", "spec_id"), _cases(skip_slow=False))
def test_same_seed_builds_identical_models(name: str, spec_id: str) -> None:
    spec = _spec(spec_id)
    a = _build(name, spec, seed=7).state_dict()
    b = _build(name, spec, seed=7).state_dict()
    c = _build(name, spec, seed=8).state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_unknown_model_is_a_config_error_naming_the_flag() -> None:
    with pytest.raises(ConfigError, match="--model") as info:
        build_model("nope", _spec("pneumonia28"))
    message = str(info.value)
    assert "nope" in message
    for name in MODELS:
        assert name in message


def test_load_arrays_rejects_arrays_of_another_model() -> None:
    spec = _spec("pneumonia28")
    model = _build("cnn", spec, seed=0)
    arrays = state_arrays(model)
    missing = dict(arrays)
    dropped = next(iter(missing))
    del missing[dropped]
    with pytest.raises(ValueError, match="missing"):
        load_arrays(model, missing)
    extra = {**arrays, "not.a.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"not\.a\.weight"):
        load_arrays(model, extra)


def _bn(prefix: str) -> list[str]:
    return [f"{prefix}.{s}" for s in ("weight", "bias", "running_mean", "running_var")] + [
        f"{prefix}.num_batches_tracked"
    ]


def _torchvision_resnet18_keys() -> set[str]:
    """The state_dict keys of ``torchvision.models.resnet18()``."""
    keys = ["conv1.weight", *_bn("bn1"), "fc.weight", "fc.bias"]
    for stage in range(1, 5):
        for block in range(2):
            p = f"layer{stage}.{block}"
            keys += [f"{p}.conv1.weight", *_bn(f"{p}.bn1"), f"{p}.conv2.weight", *_bn(f"{p}.bn2")]
            if stage > 1 and block == 0:
                keys += [f"{p}.downsample.0.weight", *_bn(f"{p}.downsample.1")]
    return set(keys)


def test_resnet18_uses_torchvision_parameter_names() -> None:
    model = _build("resnet18", _spec("blood28"), seed=0)
    state = model.state_dict()
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "fc.weight"):
        assert key in state
    assert set(state) == _torchvision_resnet18_keys()
    assert state["fc.weight"].shape == (8, 512)
    assert state["layer4.1.conv2.weight"].shape == (512, 512, 3, 3)


def test_resnet50_uses_bottleneck_blocks_with_torchvision_names() -> None:
    state = _build("resnet50", _spec("pneumonia28"), seed=0).state_dict()
    assert state["fc.weight"].shape == (2, 2048)
    assert state["layer1.0.conv3.weight"].shape == (256, 64, 1, 1)
    assert state["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert "layer3.5.bn3.running_var" in state
    assert "layer3.6.conv1.weight" not in state


@pytest.mark.parametrize(("size", "kernel"), [(28, 3), (64, 3), (128, 7)])
def test_resnet_stem_depends_on_image_size(size: int, kernel: int) -> None:
    model = _build("resnet18", spec_for("pneumoniamnist", size), seed=0)
    assert model.state_dict()["conv1.weight"].shape == (64, 1, kernel, kernel)


def test_3d_resnet_uses_3d_convolutions() -> None:
    state = _build("resnet18", _spec("organ3d28"), seed=0).state_dict()
    assert state["conv1.weight"].shape == (64, 1, 3, 3, 3)
    assert state["fc.weight"].shape == (11, 512)


# ------------------------------------------------------------------ --model auto
@pytest.mark.parametrize(
    ("dataset", "expected"),
    [
        ("pneumoniamnist", "cnn"),
        ("chestmnist", "cnn"),
        ("organmnist3d", "cnn"),
        ("brain-tumor-mri", "resnet10"),
        ("folder:/data/xrays", "resnet10"),
    ],
)
def test_auto_is_the_data_set_s_default(dataset: str, expected: str) -> None:
    assert default_model(dataset) == resolve_model("auto", dataset) == expected
    assert resolve_model("resnet18", dataset) == "resnet18"  # a named model is kept


@pytest.mark.parametrize(
    ("dataset", "size", "expected"),
    [("adrenalmnist3d", 64, "resnet10"), ("adrenalmnist3d", 28, "cnn"), ("pathmnist", 64, "cnn")],
)
def test_auto_at_a_size(dataset: str, size: int, expected: str) -> None:
    """3D volumes at 64 px get the compact ResNet; 28 px volumes and 2D sets keep the CNN."""
    assert resolve_model("auto", dataset, size) == expected


@pytest.mark.parametrize(
    ("dataset", "size", "expected"),
    [
        ("pneumoniamnist", 0, "scatternet"),
        ("dermamnist", 64, "scatternet"),
        ("brain-tumor-mri", 0, "scatternet"),
        ("organmnist3d", 28, "cnn"),
        ("adrenalmnist3d", 64, "resnet10"),
    ],
)
def test_auto_under_dp_sgd_is_scatternet_on_2d_sets(dataset: str, size: int, expected: str) -> None:
    """--privacy sample picks the few-parameter ScatterNet wherever it fits (2D sets);
    3D sets keep their defaults, and a named model is kept."""
    assert default_model(dataset, size, "sample") == expected
    assert resolve_model("auto", dataset, size, "sample") == expected
    assert resolve_model("cnn", dataset, size, "sample") == "cnn"
    assert resolve_model("auto", dataset, size, "hospital") == resolve_model("auto", dataset, size)


def test_scatternet_trains_only_its_linear_layer_and_sends_nothing_else() -> None:
    """The scattering filters are fixed and left out of the state dict (never sent or
    averaged); larger images are pooled to an 8 x 8 grid, so the layer stays small."""
    small = build_model("scatternet", _spec("pneumonia28"))
    assert list(small.state_dict()) == ["fc.weight", "fc.bias"]
    assert small.fc.in_features == 81 * 7 * 7
    big = build_model("scatternet", spec_for("dermamnist", 224))
    assert big.fc.in_features == 3 * 81 * 8 * 8
    assert list(big.state_dict()) == ["fc.weight", "fc.bias"]
    with pytest.raises(ConfigError, match="2D only"):
        build_model("scatternet", _spec("organ3d28"))


@pytest.fixture
def scatter_cache() -> Iterator[Any]:
    """A fresh 1 MB feature cache for the test; the process's own one afterwards."""
    from medbloom.models import scatter

    yield scatter.configure_feature_cache(1)
    scatter.configure_feature_cache(scatter.default_cache_mb())


def test_scatternet_features_come_from_the_cache_unchanged(scatter_cache: Any) -> None:
    """Each image is transformed once per process: a second pass (in any batch, flipped
    images being new ones) reads the cache and gives the very same outputs."""
    torch.manual_seed(0)
    model = build_model("scatternet", _spec("pneumonia28"))
    x = torch.rand(12, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        direct = model._features(x)
        first = model(x)
        assert (scatter_cache.hits, scatter_cache.misses, len(scatter_cache)) == (0, 12, 12)
        again = model(x[3:9])  # another batch of seen images: all from the cache
        assert (scatter_cache.hits, scatter_cache.misses) == (6, 12)
        mixed = model.features(torch.cat([x[:2], x[:2].flip(-1)]))  # 2 seen, 2 new
        assert (scatter_cache.hits, scatter_cache.misses) == (8, 14)
    assert torch.equal(model.features(x), direct)
    assert torch.allclose(again, first[3:9], atol=1e-6)  # the matmul may block differently
    assert torch.equal(mixed[:2], direct[:2])
    assert torch.equal(mixed[2:], model._features(x[:2].flip(-1)))


def test_scatternet_cache_keeps_to_its_budget(scatter_cache: Any) -> None:
    """Once the budget (1 MB here) is full the cache keeps the images it holds, so the
    next pass over the same set still finds them."""
    model = build_model("scatternet", _spec("pneumonia28"))
    per_image = 81 * 7 * 7 * 4
    room = 2**20 // per_image
    x = torch.rand(room + 20, 1, 28, 28)
    with torch.no_grad():
        model.features(x)
        assert len(scatter_cache) == room and scatter_cache.bytes <= 2**20
        model.features(x)
    assert (scatter_cache.hits, scatter_cache.misses) == (room, room + 40)


def test_scatternet_trains_on_features_cached_at_evaluation(scatter_cache: Any) -> None:
    """Features first computed under inference mode (evaluation) still train the linear
    layer; an input that needs a gradient (a saliency map) bypasses the cache."""
    model = build_model("scatternet", _spec("pneumonia28"))
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    with torch.inference_mode():
        model(x)
    loss = model(x).sum()
    loss.backward()
    assert model.fc.weight.grad is not None and scatter_cache.hits == 4
    pixels = x.clone().requires_grad_(True)
    model(pixels).sum().backward()
    assert pixels.grad is not None and scatter_cache.hits == 4


@pytest.mark.parametrize(("value", "expected"), [("0", None), ("2", 2.0), ("", "default")])
def test_scatternet_cache_size_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: float | str | None, scatter_cache: Any
) -> None:
    """Megabytes from MEDBLOOM_SCATTER_CACHE_MB; unset, at most 512 MB a process and at
    most a quarter of the memory over a process per core."""
    from medbloom.models import scatter
    from medbloom.system import usable_cpus

    monkeypatch.setenv(scatter.CACHE_ENV, value)
    cache = scatter.configure_feature_cache(scatter._megabytes_from_env())
    if expected == "default":
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        assert cache is not None and 0 < cache.max_bytes <= 512 * 2**20
        assert cache.max_bytes * 4 * usable_cpus() <= memory
    else:
        assert (cache.max_bytes / 2**20 if cache is not None else None) == expected
    monkeypatch.setenv(scatter.CACHE_ENV, "lots")
    with pytest.raises(ConfigError, match="MEDBLOOM_SCATTER_CACHE_MB must be a number"):
        scatter._megabytes_from_env()


def test_the_3d_default_at_64_px_pools_after_its_strided_stem() -> None:
    """The first stage of resnet10 works at 16^3 voxels for 64^3 volumes, at 14^3 for
    the 28^3 ones only when asked (--model resnet10 at 28 px keeps its 14^3 stage)."""
    volumes = DatasetSpec("adrenalmnist3d", "binary-class", ("a", "b"), 1, 3, 64)
    model = build_model("auto", volumes)
    assert isinstance(model, ResNet) and isinstance(model.maxpool, torch.nn.MaxPool3d)
    seen: list[tuple[int, ...]] = []
    model.layer1.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[2:])))
    assert model(torch.zeros(2, 1, 64, 64, 64)).shape == (2, 2)
    assert seen == [(16, 16, 16)]
    small = build_model(
        "resnet10", DatasetSpec("organmnist3d", "multi-class", ("a", "b"), 1, 3, 28)
    )
    assert isinstance(small.maxpool, torch.nn.Identity)  # unchanged below 64 px
    flat = build_model("resnet10", DatasetSpec("folder:/x", "multi-class", ("a", "b"), 1, 2, 64))
    assert isinstance(flat.maxpool, torch.nn.Identity)  # 2D folder sets unchanged


def test_build_auto_builds_the_default() -> None:
    folder = DatasetSpec("folder:/x", "multi-class", ("a", "b", "c"), 3, 2, 64)
    built = build_model("auto", folder)
    assert isinstance(built, ResNet) and built.conv1.stride == (2, 2)
    assert sum(p.numel() for p in built.parameters()) == sum(
        p.numel() for p in build_model("resnet10", folder).parameters()
    )
    assert isinstance(build_model("auto", spec_for("pneumoniamnist", 28)), SmallCNN)


def test_auto_is_recorded_as_the_model_that_ran(tmp_path: Path) -> None:
    from PIL import Image

    from medbloom.config import ExperimentConfig
    from medbloom.experiment import prepare_run

    rng = np.random.default_rng(0)
    for split, n in (("Training", 6), ("Testing", 2)):
        for cls in ("cats", "dogs"):
            (tmp_path / "set" / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "set" / split / cls / f"{i}.png")
    cfg = ExperimentConfig(
        dataset=f"folder:{tmp_path / 'set'}",
        num_clients=2,
        partition="iid",
        min_partition_size=1,
        size=28,
        out=str(tmp_path / "run"),
    )
    run_dir = prepare_run(cfg.validate())
    recorded = json.loads((run_dir / "config.json").read_text())["config"]
    assert cfg.model == "auto" and recorded["model"] == "resnet10"
    assert cfg.lr_schedule == "auto" and recorded["lr-schedule"] == "cosine"
    assert cfg.augment == "auto" and recorded["augment"] == "flip"
