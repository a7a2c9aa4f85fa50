"""Models by name. Channels, classes and 2D/3D come from the data set's spec."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from medbloom.data.types import DatasetSpec
from medbloom.errors import ConfigError
from medbloom.models.cnn import SmallCNN
from medbloom.models.layers import Backbone
from medbloom.models.pretrained import IMAGENET_URLS, load_imagenet_weights
from medbloom.models.resnet import ResNet
from medbloom.models.scatter import ScatterNet
from medbloom.models.vgg import VGG16


@dataclass(frozen=True)
class ModelEntry:
    """A model by name.

    ``build`` makes the model for a data set, randomly initialised; ``imagenet``, for
    models with ImageNet weights, makes it in the layout those weights fit (ImageNet
    stem, ImageNet input scaling), still randomly initialised.
    """

    name: str
    description: str
    build: Callable[[DatasetSpec], nn.Module]
    imagenet: Callable[[DatasetSpec], nn.Module] | None = None


def num_outputs(spec: DatasetSpec) -> int:
    """Output units: one per class (softmax) or one per label (multi-label sigmoid)."""
    return spec.num_classes


def _resnet(depth: int, imagenet: bool = False) -> Callable[[DatasetSpec], nn.Module]:
    def build(spec: DatasetSpec) -> nn.Module:
        return ResNet(
            depth,
            spec.in_channels,
            num_outputs(spec),
            dims=spec.spatial_dims,
            # ImageNet weights were learnt behind the 7x7/2 stem and max-pool: keep it.
            small_input=spec.image_size <= 64 and not imagenet,
            imagenet_input=imagenet,
        )

    return build


def _two_d_only(name: str, spec: DatasetSpec, instead: str) -> None:
    if spec.spatial_dims != 2:
        raise ConfigError(
            f"--model {name} is 2D only and {spec.name} is {spec.spatial_dims}D: use {instead}"
        )


def _vgg16(imagenet: bool = False) -> Callable[[DatasetSpec], nn.Module]:
    def build(spec: DatasetSpec) -> nn.Module:
        _two_d_only("vgg16", spec, "cnn, resnet18 or resnet50")
        return VGG16(spec.in_channels, num_outputs(spec), imagenet_input=imagenet)

    return build


def _scatternet(spec: DatasetSpec) -> nn.Module:
    _two_d_only("scatternet", spec, "cnn or resnet10")
    return ScatterNet(spec.in_channels, num_outputs(spec), spec.image_size)


MODELS: dict[str, ModelEntry] = {
    e.name: e
    for e in (
        ModelEntry(
            "cnn",
            "small CNN (4 conv layers, GroupNorm), the fast default; 3D convolutions for 3D sets",
            lambda spec: SmallCNN(spec.in_channels, num_outputs(spec), dims=spec.spatial_dims),
        ),
        ModelEntry(
            "resnet10",
            "compact ResNet for larger images: 3x3 stem with stride 2 (3D at 64 px: and a "
            "max-pool), one basic block a stage (32-256 channels), GroupNorm; 3D for 3D sets",
            lambda spec: ResNet(
                10,
                spec.in_channels,
                num_outputs(spec),
                dims=spec.spatial_dims,
                norm_kind="group",
                base_width=32,
                stem_stride=2,
                # volumes of 64^3 and more: a max-pool after the stem as well, so the first
                # stage works at 16^3 (5x less time a batch than without; bench_3d.py)
                stem_pool=spec.spatial_dims == 3 and spec.image_size >= 64,
            ),
        ),
        ModelEntry(
            "resnet18",
            "ResNet-18 as in the MedMNIST v2 benchmark (3x3 stem at 28/64 px); 3D for 3D sets; "
            "ImageNet weights",
            _resnet(18),
            _resnet(18, imagenet=True),
        ),
        ModelEntry(
            "resnet50",
            "ResNet-50, as resnet18 with bottleneck blocks; ImageNet weights",
            _resnet(50),
            _resnet(50, imagenet=True),
        ),
        ModelEntry(
            "vgg16",
            "VGG-16 (torchvision's layout, no BatchNorm, 138M parameters), 2D only; "
            "ImageNet weights",
            _vgg16(),
            _vgg16(imagenet=True),
        ),
        ModelEntry(
            "scatternet",
            "fixed wavelet scattering features (kymatio; 2 scales, 8 angles) and a linear "
            "layer (Tramer & Boneh 2021), 2D only; the default under --privacy sample",
            _scatternet,
        ),
    )
}


AUTO = "auto"


def default_model(dataset: str, size: int = 0, privacy: str = "none") -> str:
    """The model ``--model auto`` stands for on ``dataset`` at ``size`` px (0: its default)
    under ``privacy``.

    With record-level DP-SGD (``privacy="sample"``) every 2D set gets ``scatternet``: its
    few thousand trained parameters take far less of DP-SGD's noise than a CNN's. On
    PneumoniaMNIST at epsilon 8 (10 hospitals, 20 rounds) it reached test AUC 0.94
    where the small CNN reached 0.83 (benchmarks/README.md).

    2D MedMNIST sets (28 px by default) and 3D ones at 28 px keep the small CNN, the
    fastest there. Folder sets (64 px by default) get ``resnet10``: on Brain Tumor MRI it
    trains to a higher accuracy in the same CPU time (0.896 against 0.649 in 15 minutes,
    4 hospitals, Dirichlet 0.5; benchmarks/README.md), and each round takes half as long.
    3D sets at 64 px get ``resnet10`` too: the small CNN keeps 64^3 voxels through its
    first stage and needs 26x more time a batch (bench_3d.py).
    """
    from medbloom.data.medmnist import info, is_3d

    if privacy == "sample" and not (dataset in info() and is_3d(dataset)):
        return "scatternet"
    if dataset not in info():
        return "resnet10"
    if is_3d(dataset) and size >= 64:
        return "resnet10"
    return "cnn"


def resolve_model(name: str, dataset: str, size: int = 0, privacy: str = "none") -> str:
    """``name``, or the data set's default model (at ``size`` px, under ``privacy``) for
    ``auto``."""
    return default_model(dataset, size, privacy) if name == AUTO else name


def build_model(
    name: str,
    spec: DatasetSpec,
    *,
    pretrained: str = "none",
    freeze: str = "none",
    load_weights: bool = True,
    privacy: str = "none",
) -> nn.Module:
    """Build a model for a data set; unknown names and impossible settings raise ConfigError.

    ``name`` may be ``auto``: the data set's default under ``privacy`` (see
    :func:`default_model`).

    ``pretrained="imagenet"`` builds the model in the layout of torchvision's ImageNet
    checkpoint (for a ResNet: the 7x7/2 stem and max-pool whatever the image size; for
    every model: inputs rescaled from [-1, 1] to ImageNet's normalisation) and, with
    ``load_weights``, loads the checkpoint into all but the classifier head, which is
    made for the data set's classes (downloaded once, hash-checked; see
    :mod:`medbloom.models.pretrained`). ``load_weights=False`` gives the same layout
    randomly initialised: what a client builds before the server sends it the weights.

    ``freeze="features"`` leaves only the classifier head trainable (``fc`` of the CNN
    and ResNets, ``classifier.6`` of VGG-16); frozen BatchNorm layers also stop
    updating their running statistics.
    """
    name = resolve_model(name, spec.name, spec.image_size, privacy)
    if name not in MODELS:
        raise ConfigError(
            f"--model {name!r} is unknown: expected auto or one of {', '.join(MODELS)}"
        )
    if pretrained not in ("none", "imagenet"):
        raise ConfigError(f"--pretrained {pretrained!r} is unknown: expected none or imagenet")
    if freeze not in ("none", "features"):
        raise ConfigError(f"--freeze {freeze!r} is unknown: expected none or features")
    entry = MODELS[name]
    if pretrained == "none":
        model = entry.build(spec)
    else:
        with_weights = [n for n, e in MODELS.items() if e.imagenet is not None]
        if entry.imagenet is None:
            raise ConfigError(
                f"--pretrained {pretrained}: no ImageNet weights for --model {name}; "
                f"use one of {', '.join(with_weights)}"
            )
        if spec.spatial_dims != 2 or spec.in_channels not in (1, 3):
            raise ConfigError(
                f"--pretrained {pretrained}: ImageNet weights fit 2D images with 1 or 3 "
                f"channels, and {spec.name} has {spec.spatial_dims}D images with "
                f"{spec.in_channels} channel(s); use --pretrained none"
            )
        model = entry.imagenet(spec)
        if load_weights:
            load_imagenet_weights(model, IMAGENET_URLS[name])
    if freeze == "features":
        if not isinstance(model, Backbone):
            raise ConfigError(f"--freeze {freeze}: --model {name} has no separate head")
        model.freeze_features()
    return model
