"""Project 3D Gaussians to screen-space ellipses (EWA splatting), plain PyTorch, differentiable.

Camera: world-to-camera `w2c` [4, 4] in OpenCV axes (x right, y down, z forward) and pixel
intrinsics `K` [3, 3]. A Gaussian is culled when its centre is nearer than `near` or farther
than `far`. The 2D filter (Mip-Splatting's, `2d_filter_kernel_size` 0.1 in the official
config) adds `filter_2d` pixels^2 to the screen covariance and scales opacity by
sqrt(det(cov) / det(cov + filter)), so thin Gaussians do not alias into bright lines.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Projected:
    means2d: Tensor  # [N, 2] pixel coordinates (x, y)
    conics: Tensor  # [N, 3] inverse screen covariance (a, b, c): [[a, b], [b, c]]
    depths: Tensor  # [N] camera z
    radii: Tensor  # [N] int, 3-sigma extent in pixels; 0 = culled
    opacities: Tensor  # [N] after the 2D-filter compensation


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """wxyz quaternions [N, 4] (normalised here) -> rotation matrices [N, 3, 3]."""
    w, x, y, z = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], -1).reshape(-1, 3, 3)


def check_gaussians(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, colors: Tensor) -> None:
    n = means.shape[0]
    shapes = {"means": (means, (n, 3)), "quats": (quats, (n, 4)), "scales": (scales, (n, 3)),
              "opacities": (opacities, (n,)), "colors": (colors, (n, 3))}
    for name, (t, shape) in shapes.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")


def project_gaussians(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4] wxyz
    scales: Tensor,  # [N, 3] standard deviations
    opacities: Tensor,  # [N]
    w2c: Tensor,  # [4, 4]
    K: Tensor,  # [3, 3]
    width: int,
    height: int,
    near: float = 0.01,
    far: float = 100.0,
    filter_2d: float = 0.1,
) -> Projected:
    R, t = w2c[:3, :3], w2c[:3, 3]
    cam = means @ R.T + t  # [N, 3]
    z = cam[:, 2]
    valid = (z > near) & (z < far)
    zs = torch.where(valid, z, torch.ones_like(z))
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    means2d = torch.stack([fx * cam[:, 0] / zs + cx, fy * cam[:, 1] / zs + cy], -1)

    rot = quat_to_rotmat(quats)
    m = rot * scales[:, None, :]  # R S
    cov3d = m @ m.transpose(1, 2)  # [N, 3, 3]
    # Clamp the Jacobian's x/z and y/z like 3DGS, so Gaussians far outside the view stay tame.
    lim_x, lim_y = 1.3 * (0.5 * width / fx), 1.3 * (0.5 * height / fy)
    tx = (cam[:, 0] / zs).clamp(-lim_x, lim_x) * zs
    ty = (cam[:, 1] / zs).clamp(-lim_y, lim_y) * zs
    zero = torch.zeros_like(zs)
    J = torch.stack([fx / zs, zero, -fx * tx / zs**2, zero, fy / zs, -fy * ty / zs**2], -1).reshape(-1, 2, 3)
    T = J @ R
    cov2d = T @ cov3d @ T.transpose(1, 2)  # [N, 2, 2]
    a, b, c = cov2d[:, 0, 0], cov2d[:, 0, 1], cov2d[:, 1, 1]
    det_raw = (a * c - b * b).clamp_min(0)
    a, c = a + filter_2d, c + filter_2d
    det = a * c - b * b
    valid = valid & (det > 0)
    det_safe = torch.where(valid, det, torch.ones_like(det))
    conics = torch.stack([c / det_safe, -b / det_safe, a / det_safe], -1)
    compensation = torch.sqrt((det_raw / det_safe).clamp_min(2.5e-5))
    mid = 0.5 * (a + c)
    lam = mid + torch.sqrt((mid * mid - det).clamp_min(0.1))
    radii = torch.ceil(3 * torch.sqrt(lam)).to(torch.int64)
    on_screen = ((means2d[:, 0] + radii > 0) & (means2d[:, 0] - radii < width)
                 & (means2d[:, 1] + radii > 0) & (means2d[:, 1] - radii < height))
    radii = torch.where(valid & on_screen, radii, torch.zeros_like(radii))
    return Projected(means2d, conics, z, radii, opacities * compensation)
