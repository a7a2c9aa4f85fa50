"""Models by name. Channels, classes and 2D/3D come from the data set's spec."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from medbloom.data.types import DatasetSpec
from medbloom.errors import ConfigError
from medbloom.models.cnn import SmallCNN
from medbloom.models.resnet import ResNet


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    build: Callable[[DatasetSpec], nn.Module]


def num_outputs(spec: DatasetSpec) -> int:
    """Output units: one per class (softmax) or one per label (multi-label sigmoid)."""
    return spec.num_classes


def _resnet(depth: int) -> Callable[[DatasetSpec], nn.Module]:
    def build(spec: DatasetSpec) -> nn.Module:
        return ResNet(
            depth,
            spec.in_channels,
            num_outputs(spec),
            dims=spec.spatial_dims,
            small_input=spec.image_size <= 64,
        )

    return build


MODELS: dict[str, ModelEntry] = {
    e.name: e
    for e in (
        ModelEntry(
            "cnn",
            "small CNN (4 conv layers, GroupNorm), the fast default; 3D convolutions for 3D sets",
            lambda spec: SmallCNN(spec.in_channels, num_outputs(spec), dims=spec.spatial_dims),
        ),
        ModelEntry(
            "resnet18",
            "ResNet-18 as in the MedMNIST v2 benchmark (3x3 stem at 28/64 px); 3D for 3D sets",
            _resnet(18),
        ),
        ModelEntry(
            "resnet50",
            "ResNet-50, as resnet18 with bottleneck blocks",
            _resnet(50),
        ),
    )
}


def build_model(
    name: str, spec: DatasetSpec, *, pretrained: str = "none", freeze: str = "none"
) -> nn.Module:
    """Build a model for a data set; unknown names raise ConfigError.

    ``pretrained="imagenet"`` loads ImageNet weights into the backbone;
    ``freeze="features"`` leaves only the classifier head trainable.
    """
    if name not in MODELS:
        raise ConfigError(f"--model {name!r} is unknown: expected one of {', '.join(MODELS)}")
    if pretrained != "none":
        raise ConfigError(f"--pretrained {pretrained}: not available for --model {name}")
    model = MODELS[name].build(spec)
    if freeze == "features":
        for pname, param in model.named_parameters():
            param.requires_grad = pname.startswith("fc.")
    return model
