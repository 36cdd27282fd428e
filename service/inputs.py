"""Uploads -> decoded model inputs, as numpy arrays: sniffing, probing against the limits,
decoding and resizing. No torch here (3D assets load it when they meet one): bulk
pre-processing processes (Ray tasks) import only this and skip torch's import, about two
seconds of CPU each. `service.pipeline` turns a `Decoded` into the model's `SparseBatch`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np

from .errors import BadRequest, UnsupportedType
from .media import image as img
from .media import video as vid
from .media.detect import sniff
from .media.errors import UnsupportedMediaError
from .media.limits import MediaLimits
from .media.volume import load_npz
from .uploads import DiskUpload, Upload

@dataclass
class Options:
    tokens: Literal["continuous", "discrete"] = "continuous"
    format: str | None = None  # output: png/jpeg/webp, mp4/webm, ply
    fps: float | None = None
    max_frames: int | None = None
    start: float = 0.0
    end: float | None = None
    background: tuple[int, int, int] = (255, 255, 255)
    array_format: Literal["base64", "list"] = "base64"
    preview: Literal["none", "grid", "turntable"] = "none"  # 3D reconstructions
    score: bool = False  # 3D: PSNR/SSIM of splat renders against the input's renders


@dataclass
class VideoSource:
    """A video item read tile by tile when it runs (service.streaming): the upload's bytes and
    the plan made from its header; its frames never all exist at once."""

    data: bytes | str  # the upload, or the path of the file it is kept in
    plan: vid.VideoPlan

    def tiles(self) -> Iterator[np.ndarray]:
        return vid.iter_tiles(vid.iter_frames(self.data, self.plan))

    @property
    def grid(self) -> tuple[int, int]:
        """Token rows and columns of every latent frame."""
        h, w = self.plan.resize.model
        return h // img.PATCH, w // img.PATCH


@dataclass
class Pixels:
    frames: np.ndarray  # uint8 [T, h, w, 3] at the model size; T = 1 (an image) or a multiple of 4


@dataclass
class Voxels:
    coords: np.ndarray  # int32 [n, 3] occupied voxels
    feats: np.ndarray  # float32 [n, c] their features


@dataclass
class Decoded:
    modality: str
    kind: str  # model kind: image | video | 3D
    media: dict  # sizes, fps, frames: what is needed to write outputs
    input: Pixels | Voxels | None  # None for a streamed video
    views: object | None = None  # 3D: the renders (media.render.Views) the volume was packed from
    stream: VideoSource | None = None  # videos: decoded tile by tile when the item runs


def decode(data: Upload, options: Options, limits: MediaLimits) -> Decoded:
    """Upload bytes (or a large upload's file) -> one decoded input. Modality comes from the
    content, never the file name. A video is only planned here, from its header."""
    if isinstance(data, DiskUpload):
        if data.looks_like_video():
            return _video(data.path, options, limits)
        data = data.read()
    if not data:
        raise BadRequest("empty upload")
    try:
        modality, fmt = sniff(data)
    except UnsupportedMediaError as exc:
        raise UnsupportedType(str(exc)) from None
    if modality == "image":
        return _image(data, options, limits)
    if modality == "video":
        return _video(data, options, limits)
    if modality == "volume" and fmt == "npz":
        coords, feats = load_npz(data, limits)
        return Decoded("volume", "3D", {"voxels": int(coords.shape[0])}, Voxels(coords, feats))
    if modality in ("mesh", "volume"):
        from .media import asset3d  # imported lazily: trimesh, torch and the ray caster are heavy

        coords, feats, media, views = asset3d.load_3d(data, fmt, limits)
        return Decoded(modality, "3D", media, Voxels(coords, feats), views=views)
    raise UnsupportedType(f"unsupported content ({modality}/{fmt})")


def _image(data: bytes, options: Options, limits: MediaLimits) -> Decoded:
    # Aspect and tokens are refused from the header, before decoding.
    pixels, plan = img.for_model(data, limits, options.background)
    media = {"height": plan.original[0], "width": plan.original[1], "model_height": plan.model[0],
             "model_width": plan.model[1], "frames": 1}
    return Decoded("image", "image", media, Pixels(pixels[None]))


def _video(data: bytes | str, options: Options, limits: MediaLimits) -> Decoded:
    sampling = vid.Sampling(options.fps, options.max_frames, options.start, options.end)
    plan = vid.plan_video(data, limits, sampling)
    media = {"height": plan.resize.original[0], "width": plan.resize.original[1],
             "model_height": plan.resize.model[0], "model_width": plan.resize.model[1],
             "frames": plan.expected, "fps": plan.fps, "source_fps": plan.info.fps, "codec": plan.info.codec}
    return Decoded("video", "video", media, None, stream=VideoSource(data, plan))
