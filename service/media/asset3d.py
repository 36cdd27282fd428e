"""Any 3D upload -> the model's 3D input (coords [V, 3], feats [V, 768]).

Accepted: a mesh (rendered here into 16 views, then packed), a zip of views the user rendered
(`transforms.json` + `000.png`... + `000_depth.npy`...), or an already-packed volume.
"""

from __future__ import annotations

import dataclasses
import io
import json
import zipfile
import zlib

import numpy as np

from .errors import CorruptMediaError, check_limit
from .image import decode_image
from .limits import MediaLimits
from .archive import open_archive
from .mesh import load_mesh
from .pack3d import intrinsics_from_fov, pack_views, w2c_from_c2w_opengl
from .render import Views, render_views
from .volume import check_volume, load_npz

MAX_VIEW_PIXELS = 512 * 512


def load_3d(data: bytes, fmt: str, limits: MediaLimits) -> tuple[np.ndarray, np.ndarray, dict, "Views | None"]:
    """-> (coords, feats, media description, the renders the volume was packed from, if any)."""
    if fmt == "npz":
        coords, feats = load_npz(data, limits)
        return coords, feats, {"voxels": int(len(coords))}, None
    if fmt == "views":
        images, depths, c2w, fovs = read_views_zip(data, limits)
        coords, feats = pack_views(images, depths, np.stack([intrinsics_from_fov(f) for f in fovs]),
                                   w2c_from_c2w_opengl(c2w))
        coords, feats = check_volume(coords, feats, limits)
        media = {"voxels": int(len(coords)), "views": int(len(images)), "source": "views"}
        views = Views(np.stack([_square(im) for im in images]), depths, c2w, float(fovs[0]))
        return coords, feats, media, views
    mesh = load_mesh(data, fmt, limits).normalized()
    views = render_views(mesh)
    coords, feats = pack_views(views.images, views.depths, np.stack([intrinsics_from_fov(views.fov)] * len(views.c2w)),
                               w2c_from_c2w_opengl(views.c2w))
    coords, feats = check_volume(coords, feats, limits)
    media = {"voxels": int(len(coords)), "views": int(len(views.c2w)), "source": "mesh",
             "vertices": int(len(mesh.vertices)), "faces": int(len(mesh.faces))}
    return coords, feats, media, views


def _square(image: np.ndarray) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((256, 256), Image.Resampling.LANCZOS))


def read_views_zip(data: bytes, limits: MediaLimits):
    """transforms.json (NeRF layout: camera_angle_x, frames[].file_path, transform_matrix),
    NNN.png images and NNN_depth.npy z-depth maps (negative = empty)."""
    check_limit("upload", len(data), limits.max_bytes, "bytes")
    archive = open_archive(data, limits)
    # Up to 64 views are decoded at once: each is held to 512x512, so their pixels stay bounded.
    view_limits = dataclasses.replace(limits, max_pixels=min(limits.max_pixels, MAX_VIEW_PIXELS))
    try:
        names = {n.rsplit("/", 1)[-1]: n for n in archive.namelist()}
        meta = json.loads(archive.read(names["transforms.json"]))
        frames = meta["frames"]
        check_limit("view count", len(frames), 64)
        images, depths, poses, fovs = [], [], [], []
        for frame in frames:
            stem = frame["file_path"].rsplit("/", 1)[-1].removesuffix(".png")
            images.append(decode_image(archive.read(names[f"{stem}.png"]), view_limits, background=(0, 0, 0)))
            depth = np.load(io.BytesIO(archive.read(names[f"{stem}_depth.npy"])), allow_pickle=False)
            depths.append(depth.astype(np.float32))
            poses.append(np.asarray(frame["transform_matrix"], dtype=np.float64))
            fovs.append(float(frame.get("camera_angle_x", meta.get("camera_angle_x"))))
    except (KeyError, ValueError, TypeError, zipfile.BadZipFile, zlib.error, EOFError, json.JSONDecodeError) as exc:
        raise CorruptMediaError(f"bad views archive: {type(exc).__name__}: {exc}") from None
    if len({d.shape for d in depths}) != 1 or any(d.shape != im.shape[:2] for d, im in zip(depths, images)):
        raise CorruptMediaError("every depth map must match its image's size")
    return np.stack(images), np.stack(depths), np.stack(poses), fovs
