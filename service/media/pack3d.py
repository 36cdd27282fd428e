"""Multi-view renders -> the official 64^3 feature volume.

Following the official `pack_multiview_feat.py`: every view becomes a 16 x 16 grid of RGB
patch features (768 values, ordered p1 p2 c, in [0, 1]); surface points come from unprojecting
the depth maps; a voxel of the [-0.5, 0.5]^3 grid is occupied when a surface point falls in
it; each occupied voxel takes the patch its centre projects to in the view with the smallest
projected depth (nearest sampling, align_corners=True).
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import CorruptMediaError

GRID = 64
PATCH = 16
HALF = 0.5
MAX_SURFACE_POINTS = 500_000


def intrinsics_from_fov(fov: float) -> np.ndarray:
    """Normalised pinhole intrinsics (image plane in [0, 1]) for equal x/y field of view."""
    focal = 0.5 / np.tan(fov / 2)
    return np.array([[focal, 0, 0.5], [0, focal, 0.5], [0, 0, 1.0]])


def w2c_from_c2w_opengl(c2w: np.ndarray) -> np.ndarray:
    """transforms.json pose (camera-to-world, OpenGL axes) -> world-to-camera, OpenCV axes."""
    flipped = c2w.copy()
    flipped[..., :3, 1:3] *= -1
    return np.linalg.inv(flipped)


def patch_features(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 256, 256, 3] -> float32 [N, 768, 16, 16]: each cell a 16x16 RGB patch (p1 p2 c)."""
    x = torch.from_numpy(images).float() / 255.0  # [N, H, W, 3]
    n, h, w, _ = x.shape
    x = x.reshape(n, h // PATCH, PATCH, w // PATCH, PATCH, 3).permute(0, 2, 4, 5, 1, 3)
    return x.reshape(n, PATCH * PATCH * 3, h // PATCH, w // PATCH).contiguous()


def surface_points(depths: np.ndarray, intrinsics: np.ndarray, w2c: np.ndarray, seed: int = 0) -> np.ndarray:
    """Unproject depth maps [N, H, W] (camera z, < 0 = empty) to world points [M, 3]."""
    n, h, w = depths.shape
    # The official unprojection puts pixel (i, j) at (j / W, i / H) (no half-pixel offset).
    u, v = np.meshgrid(np.arange(w) / w, np.arange(h) / h, indexing="xy")
    pix = np.stack([u, v, np.ones_like(u)], -1).reshape(-1, 3)  # [HW, 3]
    points = []
    for i in range(n):
        d = depths[i].reshape(-1)
        valid = d >= 0
        cam = (pix[valid] * d[valid, None]) @ np.linalg.inv(intrinsics[i]).T
        world = np.concatenate([cam, np.ones((len(cam), 1))], 1) @ np.linalg.inv(w2c[i]).T
        points.append(world[:, :3])
    pts = np.concatenate(points) if points else np.zeros((0, 3))
    if len(pts) > MAX_SURFACE_POINTS:
        pts = pts[np.random.default_rng(seed).permutation(len(pts))[:MAX_SURFACE_POINTS]]
    return pts


def occupied_voxels(points: np.ndarray) -> np.ndarray:
    """Voxels of the 64^3 grid containing a surface point, in argwhere order: int [V, 3]."""
    inside = np.all(np.abs(points) <= HALF, axis=1)
    idx = np.floor((points[inside] + HALF) * GRID).astype(np.int64).clip(0, GRID - 1)
    grid = np.zeros((GRID,) * 3, bool)
    grid[idx[:, 0], idx[:, 1], idx[:, 2]] = True
    return np.argwhere(grid)


def voxel_features(coords: np.ndarray, feats: torch.Tensor, intrinsics: np.ndarray, w2c: np.ndarray) -> np.ndarray:
    """Nearest-view patch for every voxel centre: float32 [V, 768] in [0, 1].

    coords: int [V, 3]; feats: float32 [N, 768, 16, 16]; intrinsics, w2c: [N, 3, 3], [N, 4, 4].
    The official code samples every view at every voxel (`grid_sample`, nearest, zeros outside,
    align_corners=True), then keeps the nearest view's sample: [N, 768, V] floats, 1 GB for 20,000
    voxels and 16 views. Only the kept cell is read here, at the index grid_sample computes (same
    float operations, rounded half to even), so the features are the same and memory is [V, 768]."""
    centres = torch.from_numpy((coords + 0.5) / GRID - HALF).float()  # [V, 3]
    homo = torch.cat([centres, torch.ones(len(centres), 1)], 1)  # [V, 4]
    cam = torch.einsum("nij,vj->nvi", torch.from_numpy(w2c).float(), homo)[..., :3]  # [N, V, 3]
    proj = torch.einsum("nij,nvj->nvi", torch.from_numpy(intrinsics).float(), cam)
    uv = proj[..., :2] / proj[..., 2:3]  # [N, V, 2]
    nearest = proj[..., 2].argmin(0)  # [V]
    n, _, h, w = feats.shape
    grid = uv.gather(0, nearest.view(1, -1, 1).expand(1, -1, 2))[0] * 2 - 1  # [V, 2] (x, y) in [-1, 1]
    x = torch.round((grid[:, 0] + 1) / 2 * (w - 1)).long()  # torch.round: half to even, as nearbyint
    y = torch.round((grid[:, 1] + 1) / 2 * (h - 1)).long()
    inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    out = torch.zeros(len(coords), feats.shape[1])
    out[inside] = feats.permute(0, 2, 3, 1)[nearest[inside], y[inside], x[inside]]  # [N, 16, 16, 768] indexed
    return out.numpy()


def pack_views(images: np.ndarray, depths: np.ndarray, intrinsics: np.ndarray,
               w2c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Views -> (coords int64 [V, 3], feats float32 [V, 768])."""
    if images.shape[1:3] != (256, 256):
        images = np.stack([_resize(im) for im in images])
    coords = occupied_voxels(surface_points(depths, intrinsics, w2c))
    if len(coords) == 0:
        raise CorruptMediaError("no surface inside the unit cube: nothing to pack (check the depth maps and poses)")
    return coords, voxel_features(coords, patch_features(images), intrinsics, w2c)


def _resize(image: np.ndarray) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((256, 256), Image.Resampling.LANCZOS))
