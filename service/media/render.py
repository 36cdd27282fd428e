"""Headless multi-view rendering on the CPU by ray casting (Embree through trimesh).

Cameras follow the official 3D pipeline: N views on a sphere of radius 2 looking at the
origin, field of view 40 degrees, 256 x 256 pixels; poses stored NeRF-style (camera-to-world,
OpenGL axes) exactly as a `transforms.json` holds them. Each view gives RGB (albedo with a
soft headlight term, black background) and z-depth (-1 where no surface was hit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .mesh import ColoredMesh, face_colour_of, sample_texture

IMAGE_SIZE = 256
NUM_VIEWS = 16
FOV = math.radians(40.0)
RADIUS = 2.0


@dataclass
class Views:
    images: np.ndarray  # uint8 [N, H, W, 3]
    depths: np.ndarray  # float32 [N, H, W], camera-space z, -1 = background
    c2w: np.ndarray  # float64 [N, 4, 4] camera-to-world, OpenGL axes (transforms.json)
    fov: float  # horizontal = vertical field of view, radians


def sphere_directions(n: int) -> np.ndarray:
    """Evenly spread unit vectors (Hammersley points mapped to the sphere): [n, 3]."""
    out = []
    for i in range(n):
        u = (i + 0.5) / n
        bits, inv, v = i, 0.5, 0.0
        while bits:
            v += (bits & 1) * inv
            bits >>= 1
            inv /= 2
        phi = 2 * math.pi * v
        z = 1 - 2 * u
        r = math.sqrt(max(0.0, 1 - z * z))
        out.append((r * math.cos(phi), r * math.sin(phi), z))
    return np.asarray(out)


def look_at_c2w(eye: np.ndarray, target=np.zeros(3), up=np.array([0.0, 0.0, 1.0])) -> np.ndarray:
    """Camera-to-world matrix with OpenGL axes (x right, y up, looking down -z)."""
    forward = target - eye
    forward /= np.linalg.norm(forward)
    if abs(forward @ up) > 0.999:
        up = np.array([0.0, 1.0, 0.0])
    right = np.cross(forward, up)
    right /= np.linalg.norm(right)
    true_up = np.cross(right, forward)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, true_up, -forward, eye
    return c2w


def default_cameras(num_views: int = NUM_VIEWS, radius: float = RADIUS) -> np.ndarray:
    return np.stack([look_at_c2w(d * radius) for d in sphere_directions(num_views)])


def camera_rays(c2w: np.ndarray, fov: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Ray origins and unit directions through pixel centres: [size*size, 3] each (row-major)."""
    focal = 0.5 / math.tan(fov / 2)
    coords = (np.arange(size) + 0.5) / size
    u, v = np.meshgrid(coords, coords, indexing="xy")
    # OpenCV camera: x right, y down, z forward; pixel (u, v) in [0, 1].
    dirs_cv = np.stack([(u - 0.5) / focal, (v - 0.5) / focal, np.ones_like(u)], -1).reshape(-1, 3)
    cv_to_gl = np.diag([1.0, -1.0, -1.0])
    dirs_world = dirs_cv @ cv_to_gl.T @ c2w[:3, :3].T
    z_per_unit = 1.0 / np.linalg.norm(dirs_world, axis=1)  # camera z gained per unit along the ray
    dirs_world *= z_per_unit[:, None]
    origins = np.broadcast_to(c2w[:3, 3], dirs_world.shape)
    return np.ascontiguousarray(origins), dirs_world, z_per_unit


def render_views(mesh: ColoredMesh, c2w: np.ndarray | None = None, fov: float = FOV,
                 size: int = IMAGE_SIZE) -> Views:
    import trimesh
    from trimesh.ray.ray_pyembree import RayMeshIntersector

    c2w = default_cameras() if c2w is None else c2w
    tm = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    caster = RayMeshIntersector(tm)
    face_colours = face_colour_of(mesh) if mesh.texture is None and mesh.vertex_colors is None else None
    normals = tm.face_normals
    images = np.zeros((len(c2w), size, size, 3), np.uint8)
    depths = np.full((len(c2w), size, size), -1.0, np.float32)
    for i, pose in enumerate(c2w):
        origins, dirs, z_per_unit = camera_rays(pose, fov, size)
        tri = caster.intersects_first(origins, dirs)
        hit = tri >= 0
        if not hit.any():
            continue
        t = _ray_plane_t(tm, tri[hit], origins[hit], dirs[hit])
        points = origins[hit] + t[:, None] * dirs[hit]
        colour = _surface_colour(mesh, tri[hit], points, face_colours, tm)
        shade = 0.55 + 0.45 * np.abs(np.einsum("ij,ij->i", normals[tri[hit]], dirs[hit]))
        rgb = np.clip(colour.astype(np.float64) * shade[:, None], 0, 255).astype(np.uint8)
        flat_img = images[i].reshape(-1, 3)
        flat_img[hit] = rgb
        depths[i].reshape(-1)[hit] = (t * z_per_unit[hit]).astype(np.float32)
    return Views(images, depths, c2w, fov)


def _ray_plane_t(tm, tri: np.ndarray, origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    v0 = tm.vertices[tm.faces[tri, 0]]
    n = tm.face_normals[tri]
    denom = np.einsum("ij,ij->i", n, dirs)
    denom = np.where(np.abs(denom) < 1e-12, 1e-12, denom)
    return np.einsum("ij,ij->i", n, v0 - origins) / denom


def _surface_colour(mesh: ColoredMesh, tri: np.ndarray, points: np.ndarray, face_colours, tm) -> np.ndarray:
    if face_colours is not None:
        return face_colours[tri]
    import trimesh

    bary = trimesh.triangles.points_to_barycentric(tm.triangles[tri], points)
    bary = np.clip(np.nan_to_num(bary), 0, 1)
    corners = mesh.faces[tri]  # [n, 3]
    if mesh.vertex_colors is not None:
        return np.einsum("nk,nkc->nc", bary, mesh.vertex_colors[corners].astype(np.float64))
    uv = np.einsum("nk,nkc->nc", bary, mesh.uv[corners])
    return sample_texture(mesh.texture, uv)
