"""The official 3D Gaussian-splat decoder: a sparse transformer over occupied voxels with
shifted-window attention, emitting 32 Gaussians per voxel (TRELLIS `SLatGaussianDecoder`)."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import GaussianDecoderConfig
from .errors import InvalidInputError
from .gaussians import Gaussians
from .layers import Segments, TransformerBlock

Semantics = Literal["flash_attn", "xformers"]


def radical_inverse(base: int, n: int) -> float:
    value, inv_base, factor = 0.0, 1.0 / base, 1.0 / base
    while n > 0:
        value += (n % base) * factor
        n //= base
        factor *= inv_base
    return value


def hammersley_offsets(count: int, voxel_size: float) -> Tensor:
    """Per-Gaussian starting offsets so the tanh-bounded centres spread over the voxel: [count, 3]."""
    points = torch.tensor([[i / count, radical_inverse(2, i), radical_inverse(3, i)] for i in range(count)])
    return torch.atanh((points * 2 - 1) / voxel_size)


def sincos_embedding(xyz: Tensor, channels: int) -> Tensor:
    """Absolute sin/cos embedding of voxel coords: xyz [N, 3] -> [N, channels] float32."""
    freq_dim = channels // 3 // 2
    freqs = 10000.0 ** (-torch.arange(freq_dim, dtype=torch.float32, device=xyz.device) / freq_dim)
    angles = xyz.float()[:, :, None] * freqs  # [N, 3, fd]
    emb = torch.cat([angles.sin(), angles.cos()], -1).reshape(xyz.shape[0], -1)  # [N, 3 * 2fd]
    return F.pad(emb, (0, channels - emb.shape[1]))


class GaussianDecoder(nn.Module):
    def __init__(self, cfg: GaussianDecoderConfig):
        super().__init__()
        self.cfg = cfg
        c, g = cfg.model_channels, cfg.num_gaussians
        self.register_buffer("offset_perturbation", hammersley_offsets(g, cfg.voxel_size))
        self.input_layer = nn.Linear(cfg.latent_channels, c, bias=False)
        self.blocks = nn.ModuleList(
            TransformerBlock(c, cfg.num_heads, cfg.mlp_channels, bias=False, rms_norm=True, qk_rms_norm=False)
            for _ in range(cfg.num_blocks)
        )
        self.out_layer = nn.Linear(c, 14 * g)

    def windows(self, coords: Tensor, shift: int) -> tuple[Tensor, Segments]:
        """Order of tokens grouped by shifted window, and the window lengths. coords: [N, 4]."""
        ws = self.cfg.window_size
        cells = torch.div(coords[:, 1:] + shift, ws, rounding_mode="floor")  # [N, 3]
        n = math.ceil((self.cfg.resolution + shift) / ws)
        window_id = ((coords[:, 0] * n + cells[:, 0]) * n + cells[:, 1]) * n + cells[:, 2]
        order = torch.argsort(window_id, stable=True)
        return order, Segments.from_ids(window_id[order])

    def forward(self, feats: Tensor, coords: Tensor, semantics: Semantics = "flash_attn") -> Tensor:
        """Raw head output.

        feats:   [N, latent_channels] voxel features
        coords:  [N, 4] int (batch, x, y, z), each in [0, resolution)
        returns: [N, 14 * num_gaussians]
        """
        self._check(feats, coords)
        coords = coords.long()
        x = self.input_layer(feats.to(self.input_layer.weight.dtype))
        x = x + sincos_embedding(coords[:, 1:], self.cfg.model_channels).to(x.dtype)
        for i, block in enumerate(self.blocks):
            order, seg = self.windows(coords, shift=(self.cfg.window_size // 2) * (i % 2))
            # flash-attn's varlen call caps logits at 30; its equal-length fast path (every
            # window holding exactly window_size tokens) and xformers do not.
            uniform = all(length == self.cfg.window_size for length in seg.lengths)
            softcap = self.cfg.softcap if semantics == "flash_attn" and not uniform else 0.0
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel(), device=order.device)
            x = block(x[order], seg, None, softcap)[inverse]
        x = F.layer_norm(x.float(), (x.shape[-1],), eps=1e-5).to(x.dtype)
        return self.out_layer(x)

    def to_gaussians(self, raw: Tensor, coords: Tensor) -> list[Gaussians]:
        """Split the head output into one Gaussians object per batch item (voxel-major order)."""
        cfg, g = self.cfg, self.cfg.num_gaussians
        raw = raw.float()
        n = raw.shape[0]
        sizes = [3 * g, 3 * g, 3 * g, 4 * g, g]
        xyz, dc, scaling, rotation, opacity = raw.split(sizes, dim=1)
        offset = xyz.reshape(n, g, 3) * cfg.lr["_xyz"]
        if cfg.perturb_offset:
            offset = offset + self.offset_perturbation.float()
        centre = (coords[:, 1:].float() + 0.5) / cfg.resolution  # [n, 3]
        xyz_raw = centre[:, None] + torch.tanh(offset) / cfg.resolution * 0.5 * cfg.voxel_size
        fields = {
            "xyz_raw": xyz_raw,
            "features_dc": dc.reshape(n, g, 1, 3) * cfg.lr["_features_dc"],
            "scaling_raw": scaling.reshape(n, g, 3) * cfg.lr["_scaling"],
            "rotation_raw": rotation.reshape(n, g, 4) * cfg.lr["_rotation"],
            "opacity_raw": opacity.reshape(n, g, 1) * cfg.lr["_opacity"],
        }
        out = []
        batch = coords[:, 0].long()
        for b in range(int(batch.max()) + 1 if n else 0):
            mask = batch == b
            item = {k: v[mask].flatten(0, 1) for k, v in fields.items()}
            out.append(Gaussians(**item, scaling_bias=cfg.scaling_bias, opacity_bias=cfg.opacity_bias,
                                 filter_3d=cfg.filter_3d))
        return out

    def decode(self, feats: Tensor, coords: Tensor, semantics: Semantics = "flash_attn") -> list[Gaussians]:
        return self.to_gaussians(self.forward(feats, coords, semantics), coords.long())

    def _check(self, feats: Tensor, coords: Tensor) -> None:
        c = self.cfg
        if feats.ndim != 2 or feats.shape[1] != c.latent_channels:
            raise InvalidInputError(f"voxel feats must be [N, {c.latent_channels}], got {tuple(feats.shape)}")
        if coords.ndim != 2 or coords.shape[1] != 4 or coords.shape[0] != feats.shape[0]:
            raise InvalidInputError(f"voxel coords must be [N, 4] (batch, x, y, z), got {tuple(coords.shape)}")
        if coords.shape[0] == 0:
            raise InvalidInputError("no voxels to decode")
        if coords.is_floating_point():
            raise InvalidInputError(f"voxel coords must be integers, got {coords.dtype}")
        if coords[:, 1:].min() < 0 or coords[:, 1:].max() >= c.resolution or coords[:, 0].min() < 0:
            raise InvalidInputError(f"voxel coords must lie in [0, {c.resolution})")
