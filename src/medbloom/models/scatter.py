"""ScatterNet: fixed wavelet scattering features and a linear classifier.

Tramer & Boneh, "Differentially Private Learning Needs Better Features (or Much More
Data)", ICLR 2021: under DP-SGD, a linear model on a wavelet scattering transform
(2 scales, 8 angles) learns far more than an end-to-end CNN at the same epsilon, because
the noise DP-SGD adds grows with the number of trained parameters and the scattering
features need none. The transform is kymatio's; only the GroupNorm (no trained
parameters) and the linear layer come after it, as in the paper's "ScatterNet+linear".

medbloom uses it as the model ``--privacy sample`` picks on 2D sets (benchmarks/README.md
has the measurement).
"""

from __future__ import annotations

import torch
from torch import nn

from medbloom.errors import ConfigError
from medbloom.models.layers import Backbone

SCALES = 2  # J: features at 1/4 of the image size, 81 channels per input channel
ANGLES = 8  # L
CHANNELS = 1 + SCALES * ANGLES + ANGLES**2 * SCALES * (SCALES - 1) // 2  # 81
MAX_GRID = 8  # larger feature maps are average-pooled to 8 x 8


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
        b, c = x.shape[:2]
        # medbloom's pixels are in [-1, 1]; the transform is computed on [0, 1] in
        # float32 (complex FFTs have no bfloat16 kernel)
        with torch.autocast(device_type=x.device.type, enabled=False):
            s = self.scattering(((x.float() + 1.0) * 0.5).contiguous())
        s = s.reshape(b, c * CHANNELS, s.shape[-2], s.shape[-1])
        s = self.norm(self.pool(s))
        return self.fc(s.flatten(1).to(self.fc.weight.dtype))
