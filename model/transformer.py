"""The tokenizer's encoder and decoder stacks (official key layout)."""

from __future__ import annotations

from torch import Tensor, nn

from .config import TransformerConfig
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

    def trunk(self, x: Tensor, layout: TokenLayout) -> Tensor:
        """x: [N, in] in segment order -> [N, C] after the blocks."""
        x = self.input_layer(x)
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

    def forward(self, x: Tensor, layout: TokenLayout) -> Tensor:
        return self.post_layernorm(self.trunk(x, layout))


class Decoder(_Stack):
    """Latents -> tubelet features."""

    def __init__(self, cfg: TransformerConfig, in_channels: int, out_channels: int):
        super().__init__(cfg, in_channels)
        self.out_norm = make_norm(cfg.model_channels, cfg.use_rms_norm, cfg.use_bias)
        self.out_layer = nn.Linear(cfg.model_channels, out_channels, bias=cfg.use_bias)

    def forward(self, x: Tensor, layout: TokenLayout) -> Tensor:
        return self.out_layer(self.out_norm(self.trunk(x, layout)))
