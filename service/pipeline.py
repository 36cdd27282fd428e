"""Stages around the model: uploads -> model inputs (pre-processing, decoding in
`service.inputs`) and model outputs -> files and JSON (post-processing). Pure functions of bytes and arrays; the HTTP layer runs
them in a bounded thread pool and the CLI calls them directly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from model.api import Tokens
from model.metrics import psnr
from model.patchify import unpatchify_frames
from model.sparse import SparseBatch

from . import budget
from .arrays import array_from_json, array_to_json
from .errors import BadRequest, InvalidParameter
from .inputs import Options, Pixels, VideoSource, Voxels, decode
from .media import image as img
from .media.limits import MediaLimits
from .uploads import Upload
from .worker.jobs import PIXEL_FILL, JobResult, pixel_patches, voxel_patches

@dataclass
class Item:
    modality: str
    kind: str  # model kind: image | video | 3D
    batch: SparseBatch | None  # this item alone (batch index 0); None for a streamed video
    media: dict = field(default_factory=dict)  # sizes, fps, frames: what is needed to write outputs
    reference: np.ndarray | None = None  # uint8 [T, h, w, 3] at the model size, for round-trip PSNR
    views: object | None = None  # 3D: the renders (media.render.Views) the volume was packed from
    stream: VideoSource | None = None  # videos: decoded tile by tile when the item runs

    @property
    def streamed(self) -> bool:
        return self.stream is not None


def preprocess(data: Upload, options: Options, limits: MediaLimits) -> Item:
    """Upload bytes (or a large upload's file) -> one model item (see `service.inputs.decode`)."""
    d = decode(data, options, limits)
    batch = model_input(d.input) if d.input is not None else None
    reference = d.input.frames if isinstance(d.input, Pixels) else None
    return Item(d.modality, d.kind, batch, d.media, reference, views=d.views, stream=d.stream)


def model_input(source: Pixels | Voxels) -> SparseBatch:
    """Decoded pixels or voxels -> the model's input, one item (batch index 0)."""
    if isinstance(source, Pixels):
        return pixel_patches(source.frames)
    return voxel_patches(source.coords, source.feats)


# ---------------------------------------------------------------- model outputs -> arrays
def model_size_frames(tubelets: torch.Tensor, coords: torch.Tensor, kind: str, count: int | None) -> np.ndarray:
    """Reconstructed tubelets (float, or already pixels: `reconstruction_pixels`) -> uint8
    [T, h, w, 3] at the model size (images: frame 0 only)."""
    pixels = tubelets.dtype == torch.uint8
    frames = (unpatchify_frames(tubelets, coords, fill=PIXEL_FILL) if pixels
              else unpatchify_frames(tubelets, coords).clamp(-1, 1))  # [T, 3, h, w]
    frames = (frames[:1] if kind == "image" else frames[:count]).permute(0, 2, 3, 1).numpy()
    return np.ascontiguousarray(frames) if pixels else img.from_model_range(frames)


def tubelets_to_frames(tubelets: torch.Tensor, coords: torch.Tensor, kind: str, media: dict) -> Iterator[np.ndarray]:
    """Reconstructed tubelets -> uint8 frames [H, W, 3] at the input's original size, one at a
    time: only one full-size frame is ever held, whatever the frame count."""
    return frames_at_input_size(model_size_frames(tubelets, coords, kind, media.get("frames")), media)


def frames_at_input_size(pixels: np.ndarray, media: dict) -> Iterator[np.ndarray]:
    """uint8 [T, h, w, 3] at the model size -> frames at the input's original size, one at a time."""
    size = (int(media.get("height", pixels.shape[1])), int(media.get("width", pixels.shape[2])))
    for frame in pixels:
        yield img.resize_rgb(frame, size)


def round_trip_psnr(item: Item, result: JobResult) -> float | None:
    if item.reference is None or result.tubelets is None:
        return None
    rec = model_size_frames(result.tubelets, item.batch.coords, item.kind, item.reference.shape[0])
    return psnr(rec, item.reference)


# ---------------------------------------------------------------- the token JSON contract
def compact_indices(indices: torch.Tensor) -> np.ndarray:
    """FSQ indices in the smallest integer type that holds them (uint16 for 4096-code books)."""
    idx = indices.numpy()
    return idx.astype(np.uint16 if idx.max(initial=0) < 2**16 else np.int32)


def token_grid(coords: torch.Tensor, kind: str) -> str:
    """The token grid as a reader sees it: frames x rows x columns (latent frames for video),
    the voxel grid's extent for 3D. coords: [n, 4 or 5] (..., t, x, y, z)."""
    txyz = coords[:, -4:].long()
    extent = (txyz.max(0).values + 1).tolist() if len(txyz) else [0, 0, 0, 0]
    return "x".join(str(v) for v in (extent[1:] if kind == "3D" else extent[:3]))


def tokens_to_json(item_index: int, item: Item, tokens: Tokens, fmt: str) -> dict:
    coords = tokens.coords[:, 1:].numpy().astype(np.int32)  # (t, x, y, z); the batch column is implicit
    out = {"index": item_index, "modality": item.modality, "kind": item.kind, "media": item.media,
           "num_tokens": int(coords.shape[0]), "coords": array_to_json(coords, fmt)}
    if tokens.indices is not None:
        out["indices"] = array_to_json(compact_indices(tokens.indices), fmt)
    else:
        out["latents"] = array_to_json(tokens.latents.numpy().astype(np.float32), fmt, "the latents")
    return out


def tokens_from_json(entry: dict, position: int, limits: MediaLimits, model: dict) -> tuple[Tokens, str, dict]:
    """One item of /tokenize's JSON -> (tokens, kind, media), validated against the limits and
    the served model before anything is sized from it (see service.budget)."""
    where = f"items[{position}]"
    if not isinstance(entry, dict):
        raise BadRequest(f"{where} must be an object")
    kind = entry.get("kind")
    if kind not in ("image", "video", "3D"):
        raise InvalidParameter(f"{where}.kind must be image, video or 3D, got {kind!r}")
    coords = array_from_json(entry.get("coords"), f"{where}.coords")
    if coords.ndim != 2 or coords.shape[1] != 4 or not np.issubdtype(coords.dtype, np.integer):
        raise InvalidParameter(f"{where}.coords must be integer [n, 4] (t, x, y, z), got {coords.dtype} "
                               f"{list(coords.shape)}")
    grid = budget.check_token_set(coords, kind, limits, where)
    media = budget.check_media(entry.get("media"), kind, grid, limits, where)
    n = coords.shape[0]
    coords5 = torch.cat([torch.zeros(n, 1, dtype=torch.int32), torch.from_numpy(coords.astype(np.int32))], 1)
    if "indices" in entry:
        idx = _indices(array_from_json(entry["indices"], f"{where}.indices"), n, model, where)
        return Tokens(coords5, (kind,), indices=torch.from_numpy(idx)), kind, media
    if "latents" in entry:
        lat = array_from_json(entry["latents"], f"{where}.latents")
        width = model.get("latent_channels")
        if lat.shape != (n, width) or not np.issubdtype(lat.dtype, np.floating):
            raise InvalidParameter(f"{where}.latents must be float [{n}, {width}], got {lat.dtype} {list(lat.shape)}")
        if not np.isfinite(lat).all():
            raise InvalidParameter(f"{where}.latents must be finite")
        lat = lat if lat.dtype == np.float32 and lat.flags.writeable else lat.astype(np.float32)  # no second copy
        return Tokens(coords5, (kind,), latents=torch.from_numpy(lat)), kind, media
    raise InvalidParameter(f"{where} needs 'latents' (continuous) or 'indices' (discrete)")


def _indices(idx: np.ndarray, n: int, model: dict, where: str) -> np.ndarray:
    if not model.get("discrete"):
        raise InvalidParameter("these are discrete tokens but the served model has no quantizer")
    groups, size = model.get("num_codebooks"), model.get("codebook_size")
    if idx.ndim == 1:
        idx = idx[:, None]
    if idx.shape != (n, groups) or not np.issubdtype(idx.dtype, np.integer):
        raise InvalidParameter(f"{where}.indices must be integer [{n}, {groups}], got {idx.dtype} {list(idx.shape)}")
    if idx.size and (idx.min() < 0 or idx.max() >= size):
        raise InvalidParameter(f"{where}.indices must lie in [0, {size})", limit=size)
    return idx.astype(np.int64)
