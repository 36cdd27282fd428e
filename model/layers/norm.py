"""Normalisation layers with the official epsilons; statistics always in float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EPS = 1e-6


class LayerNorm(nn.LayerNorm):
    """LayerNorm with the official eps 1e-6. PyTorch's kernels accumulate half-precision
    inputs in float32 already, so no explicit up-cast is needed."""

    def __init__(self, dim: int, bias: bool = True, eps: float = EPS):
        super().__init__(dim, eps=eps, bias=bias)


class RMSNorm(nn.Module):
    """`x * rsqrt(mean(x^2) + eps) * weight` (fused kernel, float32 accumulation)."""

    def __init__(self, dim: int, eps: float = EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(dim: int, rms: bool, bias: bool) -> nn.Module:
    return RMSNorm(dim) if rms else LayerNorm(dim, bias=bias)


class QKRMSNorm(nn.Module):
    """Per-head L2 normalisation of queries or keys times a learned gain and sqrt(head_dim)."""

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(num_heads, head_dim))
        self.scale = head_dim**0.5

    def forward(self, x: Tensor) -> Tensor:  # x: [N, H, D]
        return (F.normalize(x.float(), dim=-1) * self.gamma.float() * self.scale).to(x.dtype)
