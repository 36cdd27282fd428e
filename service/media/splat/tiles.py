"""Bin projected Gaussians into 16 x 16 pixel tiles, each tile's list sorted front to back."""

from __future__ import annotations

import torch
from torch import Tensor

TILE = 16


def tile_intersections(means2d: Tensor, radii: Tensor, depths: Tensor, width: int, height: int,
                       tile: int = TILE) -> tuple[Tensor, Tensor]:
    """-> (tile_offsets [tiles + 1] int64, gaussian_ids [M] int64): tile k holds
    gaussian_ids[tile_offsets[k]:tile_offsets[k + 1]], nearest first. Tiles are row-major."""
    tiles_x, tiles_y = -(-width // tile), -(-height // tile)
    dev = means2d.device  # every index tensor lives beside the Gaussians (CPU or CUDA)
    visible = torch.nonzero(radii > 0).flatten()
    if visible.numel() == 0:
        return (torch.zeros(tiles_x * tiles_y + 1, dtype=torch.int64, device=dev),
                torch.zeros(0, dtype=torch.int64, device=dev))
    m, r = means2d[visible].detach(), radii[visible]
    x0 = ((m[:, 0] - r) / tile).floor().clamp(0, tiles_x - 1).long()
    x1 = ((m[:, 0] + r) / tile).floor().clamp(0, tiles_x - 1).long()
    y0 = ((m[:, 1] - r) / tile).floor().clamp(0, tiles_y - 1).long()
    y1 = ((m[:, 1] + r) / tile).floor().clamp(0, tiles_y - 1).long()
    nx, ny = x1 - x0 + 1, y1 - y0 + 1
    counts = nx * ny
    owner = torch.repeat_interleave(torch.arange(len(visible), device=dev), counts)  # [M] index into visible
    first = torch.cumsum(counts, 0) - counts
    local = torch.arange(int(counts.sum()), device=dev) - first[owner]
    tx = x0[owner] + local % nx[owner]
    ty = y0[owner] + torch.div(local, nx[owner], rounding_mode="floor")
    tile_id = ty * tiles_x + tx
    # Sort by tile, then depth: one stable sort on depth, then a stable sort on tile.
    depth = depths[visible].detach()[owner]
    order = torch.argsort(depth, stable=True)
    order = order[torch.argsort(tile_id[order], stable=True)]
    ids = visible[owner[order]]
    counts_per_tile = torch.bincount(tile_id, minlength=tiles_x * tiles_y)
    offsets = torch.zeros(tiles_x * tiles_y + 1, dtype=torch.int64, device=dev)
    offsets[1:] = torch.cumsum(counts_per_tile, 0)
    return offsets, ids
