"""Attention-pooling head: one learned query per sample over all its tokens (SigLIP MAP head)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import segment_softmax_pool
from .mlp import Mlp
from .norm import LayerNorm


class PoolAttention(nn.Module):
    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.to_q = nn.Linear(channels, channels)
        self.to_kv = nn.Linear(channels, 2 * channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, query: Tensor, x: Tensor, sample: Tensor, num_samples: int) -> Tensor:
        """query: [C]; x: [N, C]; sample: [N] -> [B, C]"""
        q = self.to_q(query).reshape(1, self.num_heads, self.head_dim).expand(num_samples, -1, -1)
        k, v = self.to_kv(x).unflatten(-1, (2, self.num_heads, self.head_dim)).unbind(1)
        out = segment_softmax_pool(q, k, v, sample, num_samples, self.head_dim**-0.5)
        return self.to_out(out.flatten(1))


class AttentionPoolHead(nn.Module):
    def __init__(self, channels: int, num_heads: int, mlp_channels: int):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(channels))
        self.attention = PoolAttention(channels, num_heads)
        self.layernorm = LayerNorm(channels)
        self.mlp = Mlp(channels, mlp_channels)

    def forward(self, x: Tensor, sample: Tensor, num_samples: int) -> Tensor:
        """Raw pooled features, not normalised: x [N, C], sample [N] -> [B, C]."""
        o = self.attention(self.probe, x, sample, num_samples)
        return o + self.mlp(self.layernorm(o))
