"""Learned 2D position table, resized to each sample's token grid (official `joint` pe mode)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import POS_TABLE_SIDE


class LearnedPosTable(nn.Module):
    def __init__(self, channels: int, side: int = POS_TABLE_SIDE):
        super().__init__()
        self.side = side
        self.position_embedding = nn.Embedding(side * side, channels)

    def grid(self, height: int, width: int) -> Tensor:
        """The table resized to [height, width, C] (bilinear, antialiased, float32).

        The official code interpolates even when the size is already 16x16, which is the
        identity for this mode, so doing it unconditionally costs nothing in accuracy.
        """
        table = self.position_embedding.weight.float()
        table = table.reshape(self.side, self.side, -1).permute(2, 0, 1)[None]  # [1, C, 16, 16]
        resized = F.interpolate(table, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
        return resized[0].permute(1, 2, 0)  # [h, w, C]

    def forward(self, rows: Tensor, cols: Tensor, sample: Tensor, grid_sizes: list[tuple[int, int]]) -> Tensor:
        """Position embedding of every token.

        rows, cols, sample: [N] int64 (x, y, batch index)
        grid_sizes:         per sample (max_x + 1, max_y + 1)
        returns:            [N, C] float32
        """
        # One resized grid per distinct size, flattened into one table, so the lookup is a
        # single gather however many samples share a size.
        unique = sorted(set(grid_sizes))
        flat = torch.cat([self.grid(h, w).reshape(h * w, -1) for h, w in unique])
        starts, offset = {}, 0
        for h, w in unique:
            starts[(h, w)] = offset
            offset += h * w
        base = torch.tensor([starts[s] for s in grid_sizes], device=rows.device)
        width = torch.tensor([w for _, w in grid_sizes], device=rows.device)
        return flat[base[sample] + rows * width[sample] + cols]
