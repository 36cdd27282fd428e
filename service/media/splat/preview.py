"""Previews and scores of 3D reconstructions: a PNG grid of views, an MP4 turntable, and
PSNR / SSIM of rendered splats against the input's renders from the same cameras."""

from __future__ import annotations

import math

import numpy as np
import torch

from model.gaussians import SH_C0, Gaussians

from ..pack3d import w2c_from_c2w_opengl
from ..render import IMAGE_SIZE, FOV, default_cameras, look_at_c2w
from . import render


def pixel_intrinsics(fov: float, size: int) -> torch.Tensor:
    focal = 0.5 * size / math.tan(fov / 2)
    return torch.tensor([[focal, 0, size / 2], [0, focal, size / 2], [0, 0, 1.0]])


def render_gaussian_views(g: Gaussians, c2w: np.ndarray, size: int = IMAGE_SIZE, fov: float = FOV,
                          background=(0.0, 0.0, 0.0)) -> np.ndarray:
    """uint8 [N, size, size, 3] renders of the Gaussians from transforms.json-style poses."""
    colors = (0.5 + SH_C0 * g.features_dc[:, 0]).clamp_min(0)
    K = pixel_intrinsics(fov, size)
    bg = torch.tensor(background, dtype=torch.float32)
    out = []
    for w2c in w2c_from_c2w_opengl(c2w):
        img, _ = render(g.xyz.float(), g.rotation.float(), g.scaling.float(), g.opacity[:, 0].float(), colors.float(),
                        torch.from_numpy(w2c).float(), K, size, size, bg)
        out.append((img.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy())
    return np.stack(out)


def preview_grid(g: Gaussians, views: int = 4, size: int = 256) -> np.ndarray:
    frames = render_gaussian_views(g, default_cameras(views), size)
    cols = math.ceil(math.sqrt(views))
    rows = math.ceil(views / cols)
    grid = np.zeros((rows * size, cols * size, 3), np.uint8)
    for i, f in enumerate(frames):
        r, c = divmod(i, cols)
        grid[r * size:(r + 1) * size, c * size:(c + 1) * size] = f
    return grid


def turntable(g: Gaussians, frames: int = 24, size: int = 256, elevation_deg: float = 20.0) -> np.ndarray:
    el = math.radians(elevation_deg)
    poses = np.stack([look_at_c2w(2.0 * np.array([math.cos(a) * math.cos(el), math.sin(a) * math.cos(el), math.sin(el)]))
                      for a in np.linspace(0, 2 * math.pi, frames, endpoint=False)])
    return render_gaussian_views(g, poses, size)
