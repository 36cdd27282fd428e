"""Gaussian-splat rendering: projection and tiling in PyTorch, compositing by the plain
PyTorch reference or the Triton kernel. `ATOKEN_SPLAT_BACKEND` (auto|torch|triton) picks;
auto uses Triton for CUDA tensors when it is installed, the reference otherwise."""

from __future__ import annotations

import torch
from torch import Tensor

from model.layers.switch import Switch

from .project import Projected, check_gaussians, project_gaussians
from .reference import rasterize_reference
from .tiles import tile_intersections

BACKENDS = ("auto", "torch", "triton")
_backend = Switch("ATOKEN_SPLAT_BACKEND", BACKENDS, "splat backend")


def set_backend(name: str) -> None:
    _backend.set(name)  # ConfigError (a ValueError) names the choices


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _rasterizer(device: torch.device):
    choice = _backend.value
    use_triton = choice == "triton" or (choice == "auto" and device.type == "cuda" and triton_available())
    if use_triton:
        from .triton_kernel import rasterize_triton

        return rasterize_triton
    return rasterize_reference


def render(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4] wxyz
    scales: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    colors: Tensor,  # [N, 3]
    w2c: Tensor,  # [4, 4] OpenCV axes
    K: Tensor,  # [3, 3] pixels
    width: int,
    height: int,
    background: Tensor | None = None,  # [3]
    near: float = 0.01,
    far: float = 100.0,
    filter_2d: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """-> (image [H, W, 3], alpha [H, W])."""
    check_gaussians(means, quats, scales, opacities, colors)
    p = project_gaussians(means, quats, scales, opacities, w2c, K, width, height, near, far, filter_2d)
    offsets, ids = tile_intersections(p.means2d, p.radii, p.depths, width, height)
    raster = _rasterizer(means.device)
    return raster(p.means2d, p.conics, colors, p.opacities, offsets, ids, width, height, background)


__all__ = ["Projected", "project_gaussians", "rasterize_reference", "render", "set_backend", "tile_intersections"]
