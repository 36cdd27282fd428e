"""Finite scalar quantization as in the official AToken So/D model.

The latent is split into `num_codebooks` groups of `len(levels)` dims; each dim is bounded
with a shifted tanh, rounded (half to even, like torch.round) to one of L levels and
rescaled to [-1, 1). A group's code is one index in [0, prod(levels)).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import FSQConfig
from .errors import InvalidInputError


class FSQ(nn.Module):
    def __init__(self, cfg: FSQConfig):
        super().__init__()
        self.cfg = cfg
        levels = torch.tensor(cfg.levels, dtype=torch.float32)
        basis = torch.cumprod(torch.tensor((1,) + cfg.levels[:-1], dtype=torch.long), 0)
        # Non-persistent: the official state dict carries no quantizer keys.
        self.register_buffer("levels", levels, persistent=False)
        self.register_buffer("basis", basis, persistent=False)

    def _bound_terms(self) -> tuple[Tensor, Tensor, Tensor]:
        half_l = (self.levels - 1) * (1 + 1e-3) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        return half_l, offset, torch.atanh(offset / half_l)

    def bound(self, z: Tensor) -> Tensor:
        """z: [..., D] -> bounded values in (-L/2, L/2) before rounding."""
        half_l, offset, shift = self._bound_terms()
        return torch.tanh(z + shift) * half_l - offset

    def bound_slope(self) -> Tensor:
        """[D] d bound / dz at z = 0, where `bound` is about linear."""
        half_l, _, shift = self._bound_terms()
        return half_l * (1 - torch.tanh(shift) ** 2)

    def _grouped(self, z: Tensor) -> Tensor:
        if z.shape[-1] != self.cfg.feature_dim:
            raise InvalidInputError(f"FSQ input must have {self.cfg.feature_dim} channels, got {z.shape[-1]}")
        return z.float().unflatten(-1, (self.cfg.num_codebooks, self.cfg.codebook_dim))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """z: [N, F] -> (codes [N, F] in [-1, 1), indices [N, K] int64, bounded [N, K, d])."""
        bounded = self.bound(self._grouped(z))
        rounded = torch.round(bounded)
        half_width = torch.div(self.levels, 2, rounding_mode="floor")
        codes = rounded / half_width
        indices = self.codes_to_indices(codes)
        return codes.flatten(-2), indices, bounded

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """codes [N, K, d] -> indices [N, K]"""
        half_width = torch.div(self.levels, 2, rounding_mode="floor")
        digits = (codes * half_width + half_width).round().long()
        return (digits * self.basis).sum(-1)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """indices [N, K] int -> codes [N, K * d] float32"""
        if indices.ndim != 2 or indices.shape[1] != self.cfg.num_codebooks:
            raise InvalidInputError(
                f"indices must be [N, {self.cfg.num_codebooks}], got shape {tuple(indices.shape)}"
            )
        if indices.is_floating_point():
            raise InvalidInputError(f"indices must be integers, got {indices.dtype}")
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.cfg.codebook_size):
            raise InvalidInputError(f"indices must lie in [0, {self.cfg.codebook_size})")
        levels = self.levels.long()
        digits = torch.div(indices.long()[..., None], self.basis, rounding_mode="floor") % levels
        half_width = torch.div(levels, 2, rounding_mode="floor")
        return ((digits - half_width).float() / half_width).flatten(-2)

    @property
    def bits_per_token(self) -> float:
        return self.cfg.num_codebooks * math.log2(self.cfg.codebook_size)
