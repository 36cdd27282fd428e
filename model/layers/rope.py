"""4D rotary position embedding over (t, x, y, z) with the official frequency layout.

With head_dim D and n = D/8 frequencies per axis, rotation pair j (channels 2j, 2j+1) turns by
pos[j // n] * 10000^(-(j % n) / D). The divisor is the full head_dim, not the per-axis width.
"""

from __future__ import annotations

import torch
from torch import Tensor

AXES = 4


def rope_angles(positions: Tensor, head_dim: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos and sin of every rotation angle.

    positions: [N, 4] float32 (t, x, y, z)
    returns:   cos, sin, each [N, head_dim/2] float32
    """
    n = head_dim // (2 * AXES)
    freqs = theta ** (-torch.arange(n, dtype=torch.float32, device=positions.device) / head_dim)  # [n]
    angles = positions.float()[:, :, None] * freqs[None, None, :]  # [N, 4, n]
    angles = angles.reshape(positions.shape[0], AXES * n)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved channel pairs of every head.

    x:        [N, H, D]
    cos, sin: [N, D/2]
    """
    xf = x.float().unflatten(-1, (-1, 2))  # [N, H, D/2, 2]
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).to(x.dtype)
