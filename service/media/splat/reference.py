"""Front-to-back alpha compositing of splats, tile by tile, in plain PyTorch: the oracle for
the Triton kernel (same signature) and the CPU path. Differentiable through autograd.

Per pixel, in depth order: alpha = min(0.99, opacity * exp(-0.5 d^T conic d)); splats with
alpha < 1/255 are skipped; a splat is composited only while the transmittance after it stays
>= 1e-4 (compositing stops before the one that would cross it), as in 3DGS.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .tiles import TILE

ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.99
T_MIN = 1e-4


def rasterize_reference(
    means2d: Tensor,  # [N, 2]
    conics: Tensor,  # [N, 3]
    colors: Tensor,  # [N, C]
    opacities: Tensor,  # [N]
    tile_offsets: Tensor,  # [tiles + 1]
    gaussian_ids: Tensor,  # [M]
    width: int,
    height: int,
    background: Tensor | None = None,  # [C]
) -> tuple[Tensor, Tensor]:
    """-> (image [H, W, C], alpha [H, W])."""
    channels = colors.shape[1]
    tiles_x = -(-width // TILE)
    image = colors.new_zeros(height, width, channels)
    alpha_img = colors.new_zeros(height, width)
    offsets = tile_offsets.tolist()
    grid = torch.arange(TILE, dtype=means2d.dtype, device=means2d.device)
    ys, xs = torch.meshgrid(grid, grid,
                            indexing="ij")
    for tile in range(len(offsets) - 1):
        start, end = offsets[tile], offsets[tile + 1]
        if start == end:
            continue
        ty, tx = divmod(tile, tiles_x)
        px = (xs + tx * TILE).reshape(-1) + 0.5  # pixel centres
        py = (ys + ty * TILE).reshape(-1) + 0.5
        ids = gaussian_ids[start:end]
        d = torch.stack([px[:, None] - means2d[ids, 0], py[:, None] - means2d[ids, 1]], -1)  # [P, G, 2]
        con = conics[ids]
        power = -0.5 * (con[:, 0] * d[..., 0] ** 2 + con[:, 2] * d[..., 1] ** 2) - con[:, 1] * d[..., 0] * d[..., 1]
        alpha = (opacities[ids] * torch.exp(power.clamp(max=0))).clamp(max=ALPHA_MAX)
        alpha = torch.where((power <= 0) & (alpha >= ALPHA_MIN), alpha, torch.zeros_like(alpha))
        after = torch.cumprod(1 - alpha, dim=1)  # transmittance after each splat
        before = torch.cat([torch.ones_like(after[:, :1]), after[:, :-1]], 1)
        keep = (after >= T_MIN).to(alpha.dtype)
        keep = torch.cumprod(keep, dim=1)  # stop at the first splat that would cross T_MIN
        weight = alpha * before * keep  # [P, G]
        rgb = weight @ colors[ids]  # [P, C]
        acc = weight.sum(1)
        y0, x0 = ty * TILE, tx * TILE
        h, w = min(TILE, height - y0), min(TILE, width - x0)
        image[y0:y0 + h, x0:x0 + w] = rgb.reshape(TILE, TILE, channels)[:h, :w]
        alpha_img[y0:y0 + h, x0:x0 + w] = acc.reshape(TILE, TILE)[:h, :w]
    if background is not None:
        image = image + (1 - alpha_img)[..., None] * background
    return image, alpha_img
