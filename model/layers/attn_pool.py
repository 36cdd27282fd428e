"""Attention-pooling head: one learned query per sample over all its tokens (SigLIP MAP head)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import PoolState, segment_softmax_state
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

    def state(self, query: Tensor, x: Tensor, sample: Tensor, num_samples: int) -> PoolState:
        """query: [C]; x: [N, C]; sample: [N] -> the softmax state of each of B samples"""
        q = self.to_q(query).reshape(1, self.num_heads, self.head_dim).expand(num_samples, -1, -1)
        k, v = self.to_kv(x).unflatten(-1, (2, self.num_heads, self.head_dim)).unbind(1)
        return segment_softmax_state(q, k, v, sample, num_samples, self.head_dim**-0.5)

    def finish(self, state: PoolState) -> Tensor:
        """[B, C]"""
        return self.to_out(state.normalized().to(self.to_out.weight.dtype).flatten(1))

    def forward(self, query: Tensor, x: Tensor, sample: Tensor, num_samples: int) -> Tensor:
        return self.finish(self.state(query, x, sample, num_samples))


class AttentionPoolHead(nn.Module):
    def __init__(self, channels: int, num_heads: int, mlp_channels: int):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(channels))
        self.attention = PoolAttention(channels, num_heads)
        self.layernorm = LayerNorm(channels)
        self.mlp = Mlp(channels, mlp_channels)

    def state(self, x: Tensor, sample: Tensor, num_samples: int) -> PoolState:
        """x [N, C], sample [N] -> per-sample state; states of a sample's pieces merge exactly."""
        return self.attention.state(self.probe, x, sample, num_samples)

    def finish(self, state: PoolState) -> Tensor:
        """Raw pooled features, not normalised: [B, C]."""
        o = self.attention.finish(state)
        return o + self.mlp(self.layernorm(o))

    def forward(self, x: Tensor, sample: Tensor, num_samples: int) -> Tensor:
        return self.finish(self.state(x, sample, num_samples))
