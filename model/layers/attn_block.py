"""Pre-norm transformer block with packed self-attention, optional qk-norm and 4D RoPE."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import Segments, varlen_attention
from .mlp import Mlp
from .norm import QKRMSNorm, make_norm
from .rope import apply_rope


class SelfAttention(nn.Module):
    def __init__(self, channels: int, num_heads: int, bias: bool, qk_rms_norm: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.to_qkv = nn.Linear(channels, 3 * channels, bias=bias)
        self.to_out = nn.Linear(channels, channels, bias=bias)
        if qk_rms_norm:
            self.q_rms_norm = QKRMSNorm(num_heads, self.head_dim)
            self.k_rms_norm = QKRMSNorm(num_heads, self.head_dim)
        self.qk_rms_norm = qk_rms_norm

    def forward(
        self, x: Tensor, seg: Segments, rope: Tensor | None = None, softcap: float = 0.0
    ) -> Tensor:
        """x: [N, C]; rope: [N, head_dim/2] complex rotations or None."""
        qkv = self.to_qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim))  # [N, 3, H, D]
        v = qkv[:, 2]
        if self.qk_rms_norm:
            qk = torch.stack((self.q_rms_norm(qkv[:, 0]), self.k_rms_norm(qkv[:, 1])), 1)
        else:
            qk = qkv[:, :2]
        if rope is not None:
            qk = apply_rope(qk, rope)  # [N, 2, H, D]
        q, k = qk.unbind(1)
        out = varlen_attention(q, k, v, seg, scale=self.head_dim**-0.5, softcap=softcap)
        return self.to_out(out.flatten(1))


class TransformerBlock(nn.Module):
    def __init__(
        self, channels: int, num_heads: int, mlp_channels: int, bias: bool, rms_norm: bool, qk_rms_norm: bool
    ):
        super().__init__()
        self.norm1 = make_norm(channels, rms_norm, bias)
        self.attn = SelfAttention(channels, num_heads, bias, qk_rms_norm)
        self.norm2 = make_norm(channels, rms_norm, bias)
        self.mlp = Mlp(channels, mlp_channels, bias)

    def forward(
        self, x: Tensor, seg: Segments, rope: Tensor | None = None, softcap: float = 0.0
    ) -> Tensor:
        x = x + self.attn(self.norm1(x), seg, rope, softcap)
        return x + self.mlp(self.norm2(x))
