"""The tokenizer's encoder and decoder stacks (official key layout)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .config import PATCH_SIZE, TransformerConfig
from .layers import AttentionPoolHead, LearnedPosTable, TransformerBlock
from .layers.norm import make_norm
from .layout import TokenLayout


class _Stack(nn.Module):
    def __init__(self, cfg: TransformerConfig, in_channels: int):
        super().__init__()
        self.cfg = cfg
        c = cfg.model_channels
        self.input_layer = nn.Linear(in_channels, c, bias=cfg.use_bias)
        self.pos_embedder = LearnedPosTable(c)
        self.blocks = nn.ModuleList(
            TransformerBlock(c, cfg.num_heads, cfg.mlp_channels, cfg.use_bias, cfg.use_rms_norm, cfg.qk_rms_norm)
            for _ in range(cfg.num_blocks)
        )

    def _embed(self, x: Tensor) -> Tensor:
        return self.input_layer(x)

    def trunk(self, x: Tensor, layout: TokenLayout) -> Tensor:
        """x: [N, in] in segment order -> [N, C] after the blocks."""
        x = self._embed(x)
        pos = self.pos_embedder(layout.xy[:, 0], layout.xy[:, 1], layout.sample, layout.grid_sizes)
        x = x + pos.to(x.dtype)
        rope = layout.rope(self.cfg.head_dim)
        for block in self.blocks:
            x = block(x, layout.segments, rope)
        return x


class Encoder(_Stack):
    """Tubelet features -> token features (after `post_layernorm`); owns the pooling head."""

    def __init__(self, cfg: TransformerConfig, in_channels: int):
        super().__init__(cfg, in_channels)
        self.post_layernorm = make_norm(cfg.model_channels, cfg.use_rms_norm, cfg.use_bias)
        self.head = AttentionPoolHead(cfg.model_channels, cfg.num_heads, cfg.mlp_channels)
        # An image's tubelet is its frame then three zero frames, a voxel's its patch then
        # zeros: inputs may leave the zeros out, and only the first columns of the projection
        # meet data (a quarter of the input bytes and of the first layer's work).
        self.short_input = in_channels // PATCH_SIZE[0]

    def _embed(self, x: Tensor) -> Tensor:
        if x.shape[1] == self.short_input:
            return F.linear(x, self.input_layer.weight[:, : self.short_input], self.input_layer.bias)
        return self.input_layer(x)

    def forward(self, x: Tensor, layout: TokenLayout) -> Tensor:
        return self.post_layernorm(self.trunk(x, layout))


class Decoder(_Stack):
    """Latents -> tubelet features."""

    def __init__(self, cfg: TransformerConfig, in_channels: int, out_channels: int):
        super().__init__(cfg, in_channels)
        self.out_norm = make_norm(cfg.model_channels, cfg.use_rms_norm, cfg.use_bias)
        self.out_layer = nn.Linear(cfg.model_channels, out_channels, bias=cfg.use_bias)

    def forward(self, x: Tensor, layout: TokenLayout, columns: int | None = None) -> Tensor:
        """columns: only the first output values of each tubelet (None: all)."""
        h = self.out_norm(self.trunk(x, layout))
        if columns is None or columns >= self.out_layer.out_features:
            return self.out_layer(h)
        bias = self.out_layer.bias[:columns] if self.out_layer.bias is not None else None
        return F.linear(h, self.out_layer.weight[:columns], bias)
