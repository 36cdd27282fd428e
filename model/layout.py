"""How a packed batch is cut into attention segments and positioned.

The official encoder and decoder cut the token set into temporal tiles of 4 latent frames
(16 video frames), counted from the smallest t in the batch, and run each tile on its own:
tokens of different tiles or items never attend to each other. A segment here is one
(tile, item) pair. Inside a tile t is re-based to 0, as the official code does.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from .config import TEMPORAL_TILE
from .layers.attention import Segments
from .layers.rope import rope_angles


@dataclass
class TokenLayout:
    order: Tensor | None  # [N] rows of the input in segment order; None = already in order
    segments: Segments
    positions: Tensor  # [N, 4] float32 (t within tile, x, y, z), segment order
    xy: Tensor  # [N, 2] int64 (x, y), segment order, for the learned position table
    sample: Tensor  # [N] int64 item of each row, segment order
    grid_sizes: list[tuple[int, int]]  # per item (max_x + 1, max_y + 1) for the position table
    batch_size: int

    @classmethod
    def build(cls, coords: Tensor, batch_size: int, tile: int = TEMPORAL_TILE) -> "TokenLayout":
        """coords: [N, 5] (batch, t, x, y, z), already validated."""
        coords = coords.long()
        t = coords[:, 1]
        tile_id = torch.div(t - t.min(), tile, rounding_mode="floor")
        segment_id = tile_id * batch_size + coords[:, 0]
        order = None
        if segment_id.numel() > 1 and bool((segment_id[1:] < segment_id[:-1]).any()):
            order = torch.argsort(segment_id, stable=True)
            coords, segment_id, tile_id = coords[order], segment_id[order], tile_id[order]
        t_local = coords[:, 1] - t.min() - tile_id * tile
        positions = torch.stack((t_local, coords[:, 2], coords[:, 3], coords[:, 4]), 1).float()
        extent = torch.zeros(batch_size, 2, dtype=torch.long, device=coords.device)
        extent = extent.scatter_reduce(0, coords[:, :1].expand(-1, 2), coords[:, 2:4], reduce="amax")
        grid_sizes = [(int(h) + 1, int(w) + 1) for h, w in extent.tolist()]
        return cls(order, Segments.from_ids(segment_id), positions, coords[:, 2:4], coords[:, 0], grid_sizes, batch_size)

    @cached_property
    def inverse(self) -> Tensor | None:
        if self.order is None:
            return None
        inv = torch.empty_like(self.order)
        inv[self.order] = torch.arange(self.order.numel(), device=self.order.device)
        return inv

    def to_segment_order(self, x: Tensor) -> Tensor:
        return x if self.order is None else x[self.order]

    def to_input_order(self, x: Tensor) -> Tensor:
        return x if self.inverse is None else x[self.inverse]

    def rope(self, head_dim: int) -> Tensor:
        cache = self.__dict__.setdefault("_rope", {})
        if head_dim not in cache:
            cache[head_dim] = rope_angles(self.positions, head_dim)
        return cache[head_dim]
