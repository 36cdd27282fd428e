"""Model outputs -> files: PNG/JPEG/WebP, MP4/WebM, PLY (Gaussians) or NPZ (voxel features)."""

from __future__ import annotations

import io
import zipfile

import torch

from model.gaussians import Gaussians
from model.metrics import psnr

from .errors import InvalidParameter
from .media import image as img
from .media import video as vid
from .media.ply import gaussians_to_ply
from .media.volume import to_npz
from .pipeline import Item, frames_at_input_size, model_size_frames, tubelets_to_frames
from .worker.jobs import JobResult

FORMATS = {"image": ("png", "jpeg", "webp"), "video": ("mp4", "webm"), "3D": ("ply", "npz")}
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "mp4": "video/mp4",
               "webm": "video/webm", "ply": "application/octet-stream", "npz": "application/octet-stream"}


def choose_format(kind: str, requested: str | None, has_gaussians: bool) -> str:
    allowed = FORMATS[kind]
    if requested is None:
        return "ply" if kind == "3D" and has_gaussians else ("npz" if kind == "3D" else allowed[0])
    fmt = "jpeg" if requested == "jpg" else requested
    if fmt not in allowed:
        raise InvalidParameter(f"format {requested!r} does not fit a {kind} output; choose one of {allowed}")
    if fmt == "ply" and not has_gaussians:
        raise InvalidParameter("PLY output needs a Gaussian decoder; this server has none (use format=npz)")
    return fmt


def gaussians_from_dict(d: dict) -> Gaussians:
    return Gaussians(**d)


def render(kind: str, tubelets: torch.Tensor, coords: torch.Tensor, media: dict, gaussians: dict | None,
           fmt: str) -> bytes:
    if kind == "3D":
        if fmt == "ply":
            g = gaussians_from_dict(gaussians)
            return gaussians_to_ply(g.xyz.numpy(), g.features_dc[:, 0].numpy(), g.opacity[:, 0].numpy(),
                                    g.scaling.numpy(), g.rotation.numpy())
        feats = ((tubelets[:, :768].clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8).numpy()
        return to_npz(coords[:, 2:].numpy(), feats)
    frames = tubelets_to_frames(tubelets, coords, kind, media)
    if kind == "image":
        return img.encode_image(next(frames), fmt)
    return vid.encode_video(frames, float(media.get("fps") or 25.0), fmt)


def render_image(item: Item, result: JobResult, fmt: str) -> tuple[bytes, float | None]:
    """An image's reconstruction and its round-trip PSNR from one unpatchify (the same bytes and
    score as `render` and `round_trip_psnr`, which would each rebuild the pixels)."""
    pixels = model_size_frames(result.tubelets, item.batch.coords, "image", 1)
    score = psnr(pixels, item.reference) if item.reference is not None else None
    return img.encode_image(next(frames_at_input_size(pixels, item.media)), fmt), score


def zip_files(files: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in files:
            z.writestr(name, data)
    return buf.getvalue()


def preview_file(gaussians: dict, mode: str) -> tuple[str, bytes]:
    """A PNG grid of 4 views or a 24-frame MP4 turntable of the Gaussians."""
    from .media.splat.preview import preview_grid, turntable

    g = gaussians_from_dict(gaussians)
    if mode == "grid":
        return "preview.png", img.encode_image(preview_grid(g, views=4, size=256), "png")
    return "turntable.mp4", vid.encode_video(turntable(g, frames=24, size=256), 12.0)


def score_3d(gaussians: dict, views) -> tuple[float, float]:
    """PSNR and SSIM of splat renders against the input's renders, on 4 of its cameras."""
    from model.metrics import psnr, ssim

    from .media.splat.preview import render_gaussian_views

    pick = list(range(0, len(views.c2w), max(1, len(views.c2w) // 4)))[:4]
    ours = render_gaussian_views(gaussians_from_dict(gaussians), views.c2w[pick], views.images.shape[1], views.fov)
    return psnr(ours, views.images[pick]), ssim(ours, views.images[pick])
