"""3D Gaussians as the official (TRELLIS) representation holds them: raw values plus the
activations that turn them into positions, scales, opacities and rotations."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

SH_C0 = 0.28209479177387814  # degree-0 spherical-harmonic constant


def inverse_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


@dataclass
class Gaussians:
    xyz_raw: Tensor  # [M, 3] centres in [0, 1] grid units (`_xyz`)
    features_dc: Tensor  # [M, 1, 3] SH degree-0 colour coefficients (no activation)
    scaling_raw: Tensor  # [M, 3]
    opacity_raw: Tensor  # [M, 1]
    rotation_raw: Tensor  # [M, 4] wxyz, before the identity bias and normalisation
    scaling_bias: float = 4e-3
    opacity_bias: float = 0.1
    filter_3d: float = 9e-4

    def __len__(self) -> int:
        return self.xyz_raw.shape[0]

    @property
    def xyz(self) -> Tensor:  # [M, 3] centred on the origin, object in [-0.5, 0.5]^3
        return self.xyz_raw - 0.5

    @property
    def scaling(self) -> Tensor:  # [M, 3] standard deviations, with the 3D filter added in quadrature
        s = F.softplus(self.scaling_raw + inverse_softplus(self.scaling_bias))
        return torch.sqrt(s.square() + self.filter_3d**2)

    @property
    def opacity(self) -> Tensor:  # [M, 1] in (0, 1)
        return torch.sigmoid(self.opacity_raw + math.log(self.opacity_bias / (1 - self.opacity_bias)))

    @property
    def rotation(self) -> Tensor:  # [M, 4] unit wxyz quaternion
        identity = torch.tensor([1.0, 0.0, 0.0, 0.0], device=self.rotation_raw.device, dtype=self.rotation_raw.dtype)
        return F.normalize(self.rotation_raw + identity, dim=-1)

    @property
    def rgb(self) -> Tensor:  # [M, 3] colour in [0, 1] (clamped)
        return (0.5 + SH_C0 * self.features_dc[:, 0]).clamp(0, 1)

    def to(self, *args, **kwargs) -> "Gaussians":
        fields = {k: getattr(self, k) for k in ("xyz_raw", "features_dc", "scaling_raw", "opacity_raw", "rotation_raw")}
        return Gaussians(**{k: v.to(*args, **kwargs) for k, v in fields.items()}, scaling_bias=self.scaling_bias,
                         opacity_bias=self.opacity_bias, filter_3d=self.filter_3d)
