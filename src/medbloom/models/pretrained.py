"""ImageNet weights for ResNet-18, ResNet-50 and VGG-16: torchvision's checkpoints,
fetched with ``torch.hub`` (no torchvision needed) and checked against their SHA-256.

A checkpoint is downloaded once into ``torch.hub.get_dir()/checkpoints`` (by default
``~/.cache/torch/hub/checkpoints``; ``$TORCH_HOME`` moves it), the folder torchvision
itself uses, so a file torchvision already fetched is found. Each official file name
carries the first hex digits of its SHA-256 (``resnet18-f37072fd.pth``). ``torch.hub``
checks them only while downloading, so a file already in the folder is checked here,
once per process.
"""

from __future__ import annotations

import hashlib
import http.client
import pickle
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from medbloom.errors import ConfigError
from medbloom.models.layers import Backbone

# torchvision's IMAGENET1K_V1 weights of each model.
IMAGENET_URLS: dict[str, str] = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "vgg16": "https://download.pytorch.org/models/vgg16-397923af.pth",
}

_VERIFIED: set[tuple[str, int, int]] = set()  # (path, size, mtime) of files checked


def checkpoint_dir() -> Path:
    """Where ``torch.hub`` keeps downloaded checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def file_name(url: str) -> str:
    return Path(urlparse(url).path).name


def hash_prefix(name: str) -> str:
    """The SHA-256 prefix in a checkpoint's file name (``resnet18-f37072fd.pth``)."""
    match = torch.hub.HASH_REGEX.search(name)
    if not match or not match.group(1):
        raise ValueError(f"{name}: no SHA-256 prefix in the file name (name-<sha256>.ext)")
    return match.group(1)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify_cached(path: Path, url: str) -> None:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return
    expected = hash_prefix(path.name)
    actual = sha256_of(path)
    if not actual.startswith(expected):
        raise ConfigError(
            f"{path}: its SHA-256 starts with {actual[: len(expected)]}, not {expected} as its "
            f"name says, so it is corrupt or not the official file; delete it and run again "
            f"to download {url} (or download it elsewhere and put it in {path.parent})"
        )
    _VERIFIED.add(key)


def fetch_state_dict(url: str) -> dict[str, torch.Tensor]:
    """The state dict at ``url``: from the checkpoint folder, else downloaded there.

    The file must be named ``name-<sha256 prefix>.ext``; its hash is checked either way.
    Every failure (no internet, a corrupt or wrong file) is a one-line ConfigError that
    names the file, the folder it belongs in and the URL to fetch it from.
    """
    name = file_name(url)
    folder = checkpoint_dir()
    path = folder / name
    hash_prefix(name)
    if path.is_file():
        _verify_cached(path, url)
    try:
        state = torch.hub.load_state_dict_from_url(
            url, check_hash=True, map_location="cpu", weights_only=True
        )
    except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, refused
        raise ConfigError(
            f"ImageNet weights {name} are not in {folder} and could not be downloaded "
            f"({_one_line(exc)}); download {url} and put it in {folder}"
        ) from None
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        # A hash mismatch of a fresh download (torch.hub deletes the file), or a file
        # that passed the hash check but is no checkpoint (a wrong hash in its name).
        raise ConfigError(
            f"ImageNet weights {name} in {folder} could not be loaded ({_one_line(exc)}); "
            f"delete it if present and download {url} again"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ConfigError(f"{path}: not a state dict of tensors; download {url} again")
    return state


def load_imagenet_weights(model: nn.Module, url: str) -> None:
    """Load the ImageNet checkpoint at ``url`` into ``model``, all but its head.

    ``model`` is a :class:`Backbone` in the checkpoint's layout (torchvision's names and
    shapes). Its head keeps its own (random) initialisation: the checkpoint's has
    ImageNet's 1000 classes. For 1-channel data the first convolution's three RGB
    kernels are summed into one: a gray image is an RGB image with R = G = B, so the
    summed kernel gives exactly the response the RGB weights give to that image.
    """
    if not isinstance(model, Backbone):
        raise TypeError(f"{type(model).__name__} does not say which layers are its head")
    state = {k: v for k, v in fetch_state_dict(url).items() if not k.startswith(model.head)}
    own = model.state_dict()
    first = state.get(model.first_conv)
    target = own[model.first_conv]
    if first is not None and first.shape[1] == 3 and target.shape[1] == 1:
        state[model.first_conv] = first.sum(dim=1, keepdim=True)
    wrong = [
        f"{k} {tuple(v.shape)} (model {tuple(own[k].shape)})"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    missing = [
        k
        for k in own
        if k not in state
        and not k.startswith((*model.head, "input_norm."))  # kept: not ImageNet's
        and not k.endswith("num_batches_tracked")
    ]
    unexpected = [k for k in state if k not in own]
    if wrong or missing or unexpected:
        details = "; ".join(
            f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for what, keys in (("shapes", wrong), ("missing", missing), ("unexpected", unexpected))
            if keys
        )
        raise ConfigError(
            f"{file_name(url)} does not fit {type(model).__name__} with "
            f"{target.shape[1]} input channel(s) ({details})"
        )
    model.load_state_dict(state, strict=False)
