"""Image quality metrics on uint8 arrays [..., H, W, 3]."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM (11x11 Gaussian window, sigma 1.5, per channel)."""
    # astype first: a decoder's read-only array made float64 in a new, writable one (torch warns
    # on tensors over read-only memory)
    x = torch.from_numpy(a.reshape(-1, *a.shape[-3:]).astype(np.float64)).permute(0, 3, 1, 2) / 255
    y = torch.from_numpy(b.reshape(-1, *b.shape[-3:]).astype(np.float64)).permute(0, 3, 1, 2) / 255
    coords = torch.arange(11, dtype=torch.float64) - 5
    g1 = torch.exp(-coords**2 / (2 * 1.5**2))
    g1 /= g1.sum()
    window = (g1[:, None] * g1[None, :]).expand(3, 1, 11, 11).contiguous()
    blur = lambda t: F.conv2d(t, window, groups=3)  # noqa: E731
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return float(s.mean())
