"""ScatterNet: fixed wavelet scattering features and a linear classifier.

Tramer & Boneh, "Differentially Private Learning Needs Better Features (or Much More
Data)", ICLR 2021: under DP-SGD, a linear model on a wavelet scattering transform
(2 scales, 8 angles) learns far more than an end-to-end CNN at the same epsilon, because
the noise DP-SGD adds grows with the number of trained parameters and the scattering
features need none. The transform is kymatio's; only the GroupNorm (no trained
parameters) and the linear layer come after it, as in the paper's "ScatterNet+linear".

medbloom uses it as the model ``--privacy sample`` picks on 2D sets (benchmarks/README.md
has the measurement).

The transform is fixed and costs far more than the linear layer (at 64 px, about 4 ms an
image on one CPU core), so each process keeps the features of the images it has seen,
keyed by a hash of the image's pixels: a hospital's images (and, with ``--augment flip``,
their mirror images) are transformed once per process, not once per round, and so are the
test images the server scores every round. ``MEDBLOOM_SCATTER_CACHE_MB`` bounds the memory
(default 512 MB per process, less where one per core would take over a quarter of the
machine's memory; 0 turns the cache off). Images that need a gradient (saliency
maps) bypass it.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable

import torch
from torch import nn

from medbloom.errors import ConfigError
from medbloom.models.layers import Backbone

SCALES = 2  # J: features at 1/4 of the image size, 81 channels per input channel
ANGLES = 8  # L
CHANNELS = 1 + SCALES * ANGLES + ANGLES**2 * SCALES * (SCALES - 1) // 2  # 81
MAX_GRID = 8  # larger feature maps are average-pooled to 8 x 8
CACHE_ENV = "MEDBLOOM_SCATTER_CACHE_MB"
DEFAULT_CACHE_MB = 512


class FeatureCache:
    """Features by (image shape, pixel hash), up to a byte budget. One per process, shared
    by every ScatterNet in it (the filters depend only on the image's shape).

    Once full it keeps what it holds and computes the rest: training visits the same
    images in every round, and with least-recently-used eviction a set one image larger
    than the budget would never be found in it."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: dict[tuple[tuple[int, ...], bytes], torch.Tensor] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def lookup(
        self, images: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """``compute(images)``, computed only for the images not seen before."""
        shape = tuple(images.shape[1:])
        keys = [
            (shape, hashlib.blake2b(memoryview(img.numpy()), digest_size=16).digest())
            for img in images
        ]
        with self._lock:
            found = [self._items.get(k) for k in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            new = compute(images[missing])
            with self._lock:
                for i, f in zip(missing, new, strict=True):
                    f = f.clone()  # not a view that would keep the whole batch alive
                    found[i] = f
                    size = f.numel() * f.element_size()
                    if self.bytes + size <= self.max_bytes and keys[i] not in self._items:
                        self._items[keys[i]] = f
                        self.bytes += size
        return torch.stack([f for f in found if f is not None])


def default_cache_mb() -> float:
    """512 MB, or less where a process per core each keeping that much would take more
    than a quarter of the machine's memory (a simulation runs one hospital per core)."""
    from medbloom.system import usable_cpus

    try:
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return DEFAULT_CACHE_MB
    return min(DEFAULT_CACHE_MB, memory_mb / (4 * usable_cpus()))


def _megabytes_from_env() -> float:
    raw = os.environ.get(CACHE_ENV, "").strip()
    try:
        return float(raw) if raw else default_cache_mb()
    except ValueError:
        raise ConfigError(f"{CACHE_ENV} must be a number of megabytes, not {raw!r}") from None


_CACHE: FeatureCache | None = None
_CACHE_READ = False


def configure_feature_cache(megabytes: float) -> FeatureCache | None:
    """Replace this process's feature cache with an empty one of ``megabytes`` (0: none)."""
    global _CACHE, _CACHE_READ
    _CACHE = FeatureCache(int(megabytes * 2**20)) if megabytes > 0 else None
    _CACHE_READ = True
    return _CACHE


def feature_cache() -> FeatureCache | None:
    """This process's feature cache (None when ``MEDBLOOM_SCATTER_CACHE_MB`` is 0)."""
    if not _CACHE_READ:
        return configure_feature_cache(_megabytes_from_env())
    return _CACHE


def _scattering_class() -> type[nn.Module]:
    # kymatio 0.3.0's package-level ``kymatio.torch`` also imports its 3D transform,
    # which needs ``scipy.special.sph_harm`` (removed in SciPy 1.17); the 2D frontend
    # does not, so it is imported directly.
    try:
        from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D
    except ImportError as exc:  # pragma: no cover - kymatio is a dependency
        raise ConfigError(
            f"--model scatternet needs kymatio (pip install kymatio==0.3.0): {exc}"
        ) from None
    return ScatteringTorch2D


class ScatterNet(Backbone):
    """Scattering transform (fixed), GroupNorm without parameters, a linear layer."""

    head = ("fc.",)
    first_conv = ""

    def __init__(self, in_channels: int, num_outputs: int, image_size: int) -> None:
        super().__init__()
        if image_size < 2**SCALES * 2:
            raise ConfigError(
                f"--model scatternet needs images of at least {2**SCALES * 2} px, not {image_size}"
            )
        scattering = _scattering_class()(J=SCALES, shape=(image_size, image_size), L=ANGLES)
        # the filters are fixed: keep them out of the state dict, so they are neither
        # sent to the server every round nor averaged
        for name, buf in list(scattering.named_buffers(recurse=False)):
            scattering.register_buffer(name, buf, persistent=False)
        self.scattering = scattering
        grid = -(-image_size // 2**SCALES)
        self.pool = nn.AdaptiveAvgPool2d(MAX_GRID) if grid > MAX_GRID else nn.Identity()
        grid = min(grid, MAX_GRID)
        features = in_channels * CHANNELS
        # the paper's normalisation: 27 groups of scattering channels, no affine part
        self.norm = nn.GroupNorm(27, features, affine=False)
        self.fc = nn.Linear(features * grid * grid, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).to(self.fc.weight.dtype))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The fixed part: scattering, pooling and normalisation, flattened (float32);
        from the process's cache where it can be."""
        cache = feature_cache()
        if cache is None or x.device.type != "cpu" or x.requires_grad or len(x) == 0:
            return self._features(x)
        # a cached tensor made in inference mode could not be saved for backward later
        with torch.inference_mode(False), torch.no_grad():
            return cache.lookup(x.detach().float().contiguous(), self._features)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        # medbloom's pixels are in [-1, 1]; the transform is computed on [0, 1] in
        # float32 (complex FFTs have no bfloat16 kernel)
        with torch.autocast(device_type=x.device.type, enabled=False):
            s = self.scattering(((x.float() + 1.0) * 0.5).contiguous())
        s = s.reshape(b, c * CHANNELS, s.shape[-2], s.shape[-1])
        return self.norm(self.pool(s)).flatten(1)
