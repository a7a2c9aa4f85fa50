"""Transfer learning: VGG-16, ImageNet weights (fetch, hash check, adaptation) and freezing.

No test reaches the internet. Checkpoints are fakes with torchvision's names and shapes
and random values, written into a temporary ``$TORCH_HOME`` under a name that carries
their real SHA-256 prefix, so ``torch.hub`` finds them cached and the hash check passes
honestly; downloads are served from 127.0.0.1. The production URL table is checked only
for its names; a fake under a production name must fail the hash check.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medbloom.data.medmnist import spec_for
from medbloom.data.types import DatasetSpec
from medbloom.errors import ConfigError
from medbloom.models import MODELS, build_model
from medbloom.models.layers import IMAGENET_MEAN, IMAGENET_STD
from medbloom.models.pretrained import (
    IMAGENET_URLS,
    checkpoint_dir,
    fetch_state_dict,
    load_imagenet_weights,
)
from medbloom.models.resnet import ResNet
from medbloom.training import load_arrays, state_arrays, to_tensor, train_local

# torchvision's vgg16 (configuration D, no BatchNorm), written out: (index, in, out) of
# each convolution in ``features``, and the shapes of the three linear layers.
VGG16_CONVS = [
    (0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256),
    (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512),
    (26, 512, 512), (28, 512, 512),
]  # fmt: skip
VGG16_LINEARS = [(0, 512 * 7 * 7, 4096), (3, 4096, 4096), (6, 4096, 1000)]


def _vgg16_torchvision_shapes(in_channels: int = 3, classes: int = 1000) -> dict[str, tuple]:
    shapes: dict[str, tuple] = {}
    for i, inp, out in VGG16_CONVS:
        shapes[f"features.{i}.weight"] = (out, in_channels if i == 0 else inp, 3, 3)
        shapes[f"features.{i}.bias"] = (out,)
    for i, inp, out in VGG16_LINEARS:
        shapes[f"classifier.{i}.weight"] = (classes if i == 6 else out, inp)
        shapes[f"classifier.{i}.bias"] = (classes if i == 6 else out,)
    return shapes


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty ``$TORCH_HOME``: checkpoints are looked for in tmp_path/hub/checkpoints."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert checkpoint_dir() == tmp_path / "torch" / "hub" / "checkpoints"
    return tmp_path / "torch"


def _spec(channels: int, classes: int, size: int = 28) -> DatasetSpec:
    return DatasetSpec(
        name=f"synthetic-{channels}ch",
        task="multi-class",
        class_names=tuple(f"c{i}" for i in range(classes)),
        in_channels=channels,
        spatial_dims=2,
        image_size=size,
    )


def _save_with_hash(state: dict[str, torch.Tensor], folder: Path, stem: str) -> str:
    """Save ``state`` as ``folder/<stem>-<first 8 hex digits of its sha256>.pth``."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{stem}.tmp"
    torch.save(state, tmp)
    prefix = hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]
    name = f"{stem}-{prefix}.pth"
    tmp.rename(folder / name)
    return name


def _fake_resnet18() -> dict[str, torch.Tensor]:
    """A state dict in the layout of torchvision's resnet18 (RGB, 1000 classes)."""
    torch.manual_seed(123)
    model = ResNet(18, 3, 1000, small_input=False)
    with torch.no_grad():
        for buf in model.buffers():
            if buf.is_floating_point():
                buf.uniform_(0.5, 1.5)
    return model.state_dict()


def _fake_vgg16() -> dict[str, torch.Tensor]:
    """Random tensors with torchvision's vgg16 names and shapes, scaled as He et al. so
    activations stay finite. The two large linear layers are stride-0 views (each row one
    random value repeated), so the file stays small."""
    gen = torch.Generator().manual_seed(321)
    state = {}
    for key, shape in _vgg16_torchvision_shapes().items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        scale = (2.0 / fan_in) ** 0.5 if len(shape) > 1 else 0.01
        if key in ("classifier.0.weight", "classifier.3.weight"):
            state[key] = (torch.randn(shape[0], 1, generator=gen) * scale).expand(*shape)
        else:
            state[key] = torch.randn(*shape, generator=gen) * scale
    return state


# ------------------------------------------------------------------------------ VGG-16
@pytest.fixture(scope="module")
def vgg_rgb() -> nn.Module:
    torch.manual_seed(0)
    return build_model("vgg16", _spec(3, 1000, 224)).eval()


def test_vgg16_is_registered() -> None:
    assert "vgg16" in MODELS
    assert "2D only" in MODELS["vgg16"].description


def test_vgg16_has_torchvision_names_and_shapes(vgg_rgb: nn.Module) -> None:
    shapes = {k: tuple(v.shape) for k, v in vgg_rgb.state_dict().items()}
    assert shapes == _vgg16_torchvision_shapes()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in vgg_rgb.modules())
    assert sum(v.numel() for v in vgg_rgb.state_dict().values()) == 138_357_544


@pytest.mark.parametrize("size", [8, 28, 32, 48])
def test_vgg16_runs_on_small_inputs(vgg_rgb: nn.Module, size: int) -> None:
    x = torch.rand(2, 3, size, size) * 2 - 1
    with torch.no_grad():
        out = vgg_rgb(x)
    assert out.shape == (2, 1000)
    assert torch.isfinite(out).all()


def test_vgg16_resizes_inputs_under_32_pixels(vgg_rgb: nn.Module) -> None:
    x = torch.rand(2, 3, 28, 28) * 2 - 1
    up = nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    with torch.no_grad():
        assert torch.allclose(vgg_rgb(x), vgg_rgb(up))


def test_vgg16_is_2d_only() -> None:
    with pytest.raises(ConfigError, match="vgg16 is 2D only"):
        build_model("vgg16", spec_for("organmnist3d", 28))


# ------------------------------------------------------------------ settings and layout
def test_production_urls_are_torchvisions_imagenet1k_v1_files() -> None:
    assert IMAGENET_URLS == {
        "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
        "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
        "vgg16": "https://download.pytorch.org/models/vgg16-397923af.pth",
    }
    assert {n for n, e in MODELS.items() if e.imagenet is not None} == set(IMAGENET_URLS)


@pytest.mark.parametrize(
    ("name", "spec", "kwargs", "match"),
    [
        ("cnn", spec_for("pneumoniamnist", 28), {"pretrained": "imagenet"}, "no ImageNet weights"),
        ("resnet18", spec_for("organmnist3d", 28), {"pretrained": "imagenet"}, "2D images"),
        ("resnet18", spec_for("pneumoniamnist", 28), {"pretrained": "imagenet21k"}, "unknown"),
        ("resnet18", spec_for("pneumoniamnist", 28), {"freeze": "all"}, "--freeze"),
    ],
    ids=["cnn-has-no-weights", "3d", "unknown-weights", "unknown-freeze"],
)
def test_impossible_settings_are_config_errors(
    name: str, spec: DatasetSpec, kwargs: dict[str, str], match: str
) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        build_model(name, spec, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("size", [28, 64, 224])
def test_pretrained_resnet_uses_the_imagenet_stem_at_any_size(size: int) -> None:
    spec = spec_for("pneumoniamnist", 28) if size == 28 else _spec(1, 2, size)
    model = build_model("resnet18", spec, pretrained="imagenet", load_weights=False)
    state = model.state_dict()
    assert state["conv1.weight"].shape == (64, 1, 7, 7)
    assert isinstance(model.maxpool, nn.MaxPool2d)
    # torchvision's names, plus the input scaling's constants: a client that builds the
    # model without --pretrained cannot load these weights by mistake.
    plain = set(build_model("resnet18", _spec(1, 2, 128)).state_dict())
    assert set(state) == plain | {"input_norm.mean", "input_norm.std"}
    out = model(torch.rand(2, 1, size, size) * 2 - 1)
    assert out.shape == (2, 2) and torch.isfinite(out).all()
    assert not checkpoint_dir().exists() or not any(checkpoint_dir().iterdir())


def test_pretrained_layout_does_not_load_into_a_plain_model() -> None:
    """At 128 px both ResNets have the same layers; only the input scaling differs, and
    load_arrays (what a client does with the server's weights) says so."""
    spec = _spec(3, 2, 128)
    server = build_model("resnet18", spec, pretrained="imagenet", load_weights=False)
    with pytest.raises(ValueError, match=r"input_norm\.mean"):
        load_arrays(build_model("resnet18", spec), state_arrays(server))
    client = build_model("resnet18", spec, pretrained="imagenet", load_weights=False)
    load_arrays(client, state_arrays(server))


@pytest.mark.parametrize("channels", [1, 3])
def test_pretrained_models_feed_imagenet_normalised_pixels(channels: int) -> None:
    model = build_model("resnet18", _spec(channels, 2), pretrained="imagenet", load_weights=False)
    mean = torch.tensor(IMAGENET_MEAN if channels == 3 else [sum(IMAGENET_MEAN) / 3])
    std = torch.tensor(IMAGENET_STD if channels == 3 else [sum(IMAGENET_STD) / 3])
    pixels = torch.tensor([0, 64, 255], dtype=torch.uint8)
    x = to_tensor(pixels.view(1, 1, 1, 3).expand(1, channels, 1, 3).contiguous().numpy())
    expected = (pixels.float().view(1, 1, 1, 3) / 255 - mean.view(1, -1, 1, 1)) / std.view(
        1, -1, 1, 1
    )
    assert torch.allclose(model.input_norm(x), expected, atol=1e-5)
    plain = build_model("resnet18", _spec(channels, 2))
    assert isinstance(plain.input_norm, nn.Identity)


# ---------------------------------------------------------------- fetching checkpoints
def test_cached_checkpoint_is_loaded_after_its_hash_is_checked(torch_home: Path) -> None:
    fake = _fake_resnet18()
    name = _save_with_hash(fake, checkpoint_dir(), "resnet18")
    state = fetch_state_dict(f"https://download.pytorch.org/models/{name}")
    assert set(state) == set(fake)
    assert all(torch.equal(state[k], fake[k]) for k in fake)


def test_cached_file_with_a_wrong_hash_is_a_config_error(torch_home: Path) -> None:
    """A file under the production name whose content does not match the name's hash."""
    folder = checkpoint_dir()
    folder.mkdir(parents=True)
    torch.save(_fake_resnet18(), folder / "resnet18-f37072fd.pth")
    with pytest.raises(ConfigError) as info:
        build_model("resnet18", spec_for("pneumoniamnist", 28), pretrained="imagenet")
    message = str(info.value)
    assert "\n" not in message
    for part in (
        str(folder / "resnet18-f37072fd.pth"),
        "f37072fd",
        "delete",
        IMAGENET_URLS["resnet18"],
    ):
        assert part in message


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_missing_checkpoint_without_network_names_file_folder_and_url() -> None:
    url = f"http://127.0.0.1:{_closed_port()}/models/resnet18-0123abcd.pth"
    with pytest.raises(ConfigError) as info:
        fetch_state_dict(url)
    message = str(info.value)
    assert "\n" not in message
    for part in ("resnet18-0123abcd.pth", str(checkpoint_dir()), url, "could not be downloaded"):
        assert part in message


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on 127.0.0.1, and its base URL."""
    folder = tmp_path / "served"
    folder.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_download_is_hash_checked(served: tuple[Path, str]) -> None:
    folder, base = served
    fake = _fake_resnet18()
    name = _save_with_hash(fake, folder, "resnet18")
    state = fetch_state_dict(f"{base}/{name}")
    assert all(torch.equal(state[k], fake[k]) for k in fake)
    assert (checkpoint_dir() / name).is_file()

    (folder / name).rename(folder / "resnet18-00000000.pth")
    with pytest.raises(ConfigError, match="could not be loaded") as info:
        fetch_state_dict(f"{base}/resnet18-00000000.pth")
    assert "invalid hash value" in str(info.value)
    assert not (checkpoint_dir() / "resnet18-00000000.pth").exists()


# ------------------------------------------------------------- adapting the weights
def test_resnet18_imagenet_weights_load_into_a_gray_model() -> None:
    fake = _fake_resnet18()
    name = _save_with_hash(fake, checkpoint_dir(), "resnet18")
    spec = spec_for("pneumoniamnist", 28)
    torch.manual_seed(0)
    model = build_model("resnet18", spec, pretrained="imagenet", load_weights=False)
    head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("fc.")}
    load_imagenet_weights(model, f"https://download.pytorch.org/models/{name}")
    state = model.state_dict()
    assert torch.equal(state["conv1.weight"], fake["conv1.weight"].sum(dim=1, keepdim=True))
    for key in fake:
        if key != "conv1.weight" and not key.startswith("fc."):
            assert torch.equal(state[key], fake[key]), key
    assert state["fc.weight"].shape == (2, 512)
    assert all(torch.equal(state[k], v) for k, v in head.items())
    # A gray image through the summed kernel = the same image as R = G = B through RGB.
    g = torch.rand(2, 1, 28, 28)
    rgb = nn.functional.conv2d(g.expand(2, 3, 28, 28), fake["conv1.weight"], stride=2, padding=3)
    assert torch.allclose(model.conv1(g), rgb, atol=1e-5)
    model.eval()
    x = to_tensor(np.random.default_rng(0).integers(0, 256, (2, 1, 28, 28), dtype=np.uint8))
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_checkpoint_of_another_model_is_a_config_error() -> None:
    name = _save_with_hash(_fake_resnet18(), checkpoint_dir(), "resnet18")
    model = build_model("resnet50", _spec(3, 2), pretrained="imagenet", load_weights=False)
    with pytest.raises(ConfigError, match="does not fit ResNet") as info:
        load_imagenet_weights(model, f"https://download.pytorch.org/models/{name}")
    assert "\n" not in str(info.value)


def _changed(before: dict[str, torch.Tensor], model: nn.Module) -> set[str]:
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


def _train(model: nn.Module, spec: DatasetSpec, n: int = 8) -> None:
    rng = np.random.default_rng(0)
    size = (n, spec.in_channels, spec.image_size, spec.image_size)
    x = to_tensor(rng.integers(0, 256, size, dtype=np.uint8))
    y = torch.from_numpy(rng.integers(0, spec.num_classes, n))
    train_local(model, x, y, task=spec.task, epochs=1, batch_size=4, lr=1e-2)


def test_vgg16_imagenet_weights_load_and_only_classifier_6_trains() -> None:
    fake = _fake_vgg16()
    name = _save_with_hash(fake, checkpoint_dir(), "vgg16")
    assert (checkpoint_dir() / name).stat().st_size < 100e6
    spec = spec_for("pneumoniamnist", 28)
    torch.manual_seed(0)
    model = build_model("vgg16", spec, pretrained="imagenet", freeze="features", load_weights=False)
    head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("classifier.6")}
    load_imagenet_weights(model, f"https://download.pytorch.org/models/{name}")
    state = model.state_dict()
    assert torch.equal(
        state["features.0.weight"], fake["features.0.weight"].sum(dim=1, keepdim=True)
    )
    for key in fake:
        if key != "features.0.weight" and not key.startswith("classifier.6"):
            assert torch.equal(state[key], fake[key]), key
    assert state["classifier.6.weight"].shape == (2, 4096)
    assert all(torch.equal(state[k], v) for k, v in head.items())

    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.6.weight", "classifier.6.bias"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, spec, n=4)
    assert _changed(before, model) == trainable


# ------------------------------------------------------------------------- freezing
def test_frozen_resnet_trains_fc_only_and_keeps_batchnorm_statistics() -> None:
    spec = spec_for("pneumoniamnist", 28)
    torch.manual_seed(0)
    model = build_model("resnet18", spec, freeze="features")
    assert {k for k, p in model.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}
    model.train()
    assert model.training and model.fc.training
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, spec)
    assert _changed(before, model) == {"fc.weight", "fc.bias"}

    # Without freezing, the same training moves every layer and the BatchNorm statistics.
    torch.manual_seed(0)
    free = build_model("resnet18", spec)
    before = {k: v.clone() for k, v in free.state_dict().items()}
    _train(free, spec)
    changed = _changed(before, free)
    assert "conv1.weight" in changed and "bn1.running_mean" in changed


def test_frozen_cnn_trains_its_head_only() -> None:
    spec = spec_for("bloodmnist", 28)
    model = build_model("cnn", spec, freeze="features")
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, spec)
    assert _changed(before, model) == trainable
