"""Pixels and voxels to sparse 4D tokens and back, following the official preprocessing.

Images and videos: values in [-1, 1], channels last ([H, W, 3] or [T, H, W, 3]; a tensor whose
last dim is not 3 is read as [T, 3, H, W]). Fewer than 4 frames are zero-padded to 4; then
trailing frames that do not fill a group of 4 are dropped; H and W are centre-cropped to
multiples of 16. Tubelet (4x16x16x3) features are ordered (pt, ph, pw, c); tokens run t-major,
then row, then column; coords are (batch, t, x=row, y=col, z=0).

3D: a voxel carries a 16x16 RGB patch (768 values in [0, 1]); features become `2v - 1`,
zero-padded to 3072; coords (batch, t=1, x, y, z) on the 64^3 grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import PATCH_SIZE, PATCH_VALUES, VOXEL_FEATURES, VOXEL_GRID
from .errors import InvalidInputError
from .sparse import SparseBatch

PT, PH, PW = PATCH_SIZE


@dataclass(frozen=True)
class Crop:
    """Where the model's view sits inside the input, so outputs can be put back in place."""

    top: int
    left: int
    height: int
    width: int
    frames: int  # frames the model sees (after padding / dropping)
    input_frames: int


def standardize_frames(x: Tensor) -> Tensor:
    """[H, W, 3] / [T, H, W, 3] / [T, 3, H, W] -> [T, H, W, 3] float."""
    if not isinstance(x, Tensor):
        raise InvalidInputError(f"expected a torch tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InvalidInputError(f"pixels must be floating point in [-1, 1], got {x.dtype}")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise InvalidInputError(f"pixels must be [H, W, 3] or [T, H, W, 3], got shape {tuple(x.shape)}")
    if x.shape[-1] != 3:
        if x.shape[1] != 3:
            raise InvalidInputError(f"pixels need 3 colour channels, got shape {tuple(x.shape)}")
        x = x.permute(0, 2, 3, 1)
    return x


def plan_crop(frames: int, height: int, width: int) -> Crop:
    """The official temporal and spatial rules, as numbers."""
    t = max(frames, PT) // PT * PT
    h, w = height // PH * PH, width // PW * PW
    if h == 0 or w == 0:
        raise InvalidInputError(f"frames of {height}x{width} px are smaller than one {PH}x{PW} patch")
    return Crop((height - h) // 2, (width - w) // 2, h, w, t, frames)


def prepare_frames(x: Tensor) -> tuple[Tensor, Crop]:
    """Pad/drop frames and centre-crop: [T, H, W, 3] -> [T', H', W', 3] with T' % 4 == 0."""
    x = standardize_frames(x)
    crop = plan_crop(*x.shape[:3])
    if x.shape[0] < PT:
        x = torch.cat([x, x.new_zeros(PT - x.shape[0], *x.shape[1:])])
    x = x[: crop.frames, crop.top : crop.top + crop.height, crop.left : crop.left + crop.width]
    return x, crop


def patchify_frames(x: Tensor) -> tuple[Tensor, Tensor]:
    """[T, H, W, 3] (T % 4 == 0, H and W % 16 == 0) -> feats [n, 3072], coords [n, 4] (t, x, y, z)."""
    t, h, w, c = x.shape
    nt, nh, nw = t // PT, h // PH, w // PW
    feats = x.reshape(nt, PT, nh, PH, nw, PW, c).permute(0, 2, 4, 1, 3, 5, 6).reshape(nt * nh * nw, -1)
    return feats.contiguous(), grid_coords(nt, nh, nw).to(x.device)


def grid_coords(nt: int, nh: int, nw: int) -> Tensor:
    """int32 [nt * nh * nw, 4]: (t, x, y, 0) of every tubelet of a full grid, in patch order."""
    grid = torch.stack(torch.meshgrid(torch.arange(nt), torch.arange(nh), torch.arange(nw), indexing="ij"), -1)
    return torch.cat([grid.reshape(-1, 3), torch.zeros(nt * nh * nw, 1, dtype=torch.long)], 1).to(torch.int32)


def unpatchify_frames(feats: Tensor, coords: Tensor, fill: float = 0) -> Tensor:
    """Tokens of one item back to frames.

    feats:   [n, 3072] (or [n, 768 * k]: the first k frames of each tubelet)
    coords:  [n, 4 or 5] (..., t, x, y, z); the grid is max coord + 1 on each axis
    fill:    the value of places no token covers
    returns: [T, 3, H, W] channels first (T = 4 x latent frames, or k x latent frames)
    """
    pt = feats.shape[1] // (PH * PW * 3)
    if pt * PH * PW * 3 != feats.shape[1] or not 1 <= pt <= PT:
        raise InvalidInputError(f"tubelet features of width {feats.shape[1]}: expected a multiple of "
                                f"{PH * PW * 3} up to {PT * PH * PW * 3}")
    txy = coords[:, -4:-1].long()
    nt, nh, nw = (txy.max(0).values + 1).tolist()
    grid = feats.new_full((nt, nh, nw, pt, PH, PW, 3), fill)
    grid[txy[:, 0], txy[:, 1], txy[:, 2]] = feats.reshape(-1, pt, PH, PW, 3)
    return grid.permute(0, 3, 6, 1, 4, 2, 5).reshape(nt * pt, 3, nh * PH, nw * PW)


def frames_to_sparse(items: Sequence[Tensor]) -> tuple[SparseBatch, list[Crop]]:
    """Images ([H, W, 3]) and videos ([T, H, W, 3]) in [-1, 1] -> one packed batch.

    A 3-dim tensor is an image; a 4-dim tensor is a video (even with one frame, its kind is
    then "video" and all 4 reconstructed frames are kept).
    """
    if not items:
        raise InvalidInputError("no items to patchify")
    feats, coords, kinds, crops = [], [], [], []
    for b, item in enumerate(items):
        kinds.append("image" if item.ndim == 3 else "video")
        frames, crop = prepare_frames(item)
        f, c = patchify_frames(frames)
        feats.append(f)
        coords.append(torch.cat([torch.full_like(c[:, :1], b), c], 1))
        crops.append(crop)
    return SparseBatch(torch.cat(feats), torch.cat(coords), tuple(kinds)), crops


def voxel_coords(xyz: Tensor, b: int = 0) -> Tensor:
    """xyz [n, 3] on the 64^3 grid -> [n, 5] int32 token coords (batch b, t = 1, x, y, z)."""
    n = xyz.shape[0]
    return torch.cat([torch.full((n, 1), b), torch.ones(n, 1, dtype=torch.long), xyz.long().cpu()], 1).to(torch.int32)


def voxels_to_sparse(items: Sequence[tuple[Tensor, Tensor]]) -> SparseBatch:
    """3D items, each (coords [n, 3] int (x, y, z) in [0, 64), feats [n, 768] in [0, 1])."""
    if not items:
        raise InvalidInputError("no 3D items")
    feats, coords = [], []
    for b, (xyz, values) in enumerate(items):
        if xyz.ndim != 2 or xyz.shape[1] != 3 or values.ndim != 2 or values.shape[1] != VOXEL_FEATURES:
            raise InvalidInputError(
                f"3D item {b}: need coords [n, 3] and feats [n, {VOXEL_FEATURES}], "
                f"got {tuple(xyz.shape)} and {tuple(values.shape)}"
            )
        if xyz.shape[0] != values.shape[0] or xyz.shape[0] == 0:
            raise InvalidInputError(f"3D item {b}: {xyz.shape[0]} coords vs {values.shape[0]} feature rows")
        if xyz.min() < 0 or xyz.max() >= VOXEL_GRID:
            raise InvalidInputError(f"3D item {b}: voxel coords must lie in [0, {VOXEL_GRID})")
        feats.append(F.pad(values.float() * 2 - 1, (0, PATCH_VALUES - VOXEL_FEATURES)))
        coords.append(voxel_coords(xyz, b).to(values.device))
    return SparseBatch(torch.cat(feats), torch.cat(coords), ("3D",) * len(items))


def sparse_to_frames(batch: SparseBatch) -> list[Tensor | None]:
    """Per item [T, 3, H, W] frames (images keep frame 0 only); None for 3D items."""
    out: list[Tensor | None] = []
    for b, kind in enumerate(batch.kinds):
        if kind == "3D":
            out.append(None)
            continue
        mask = batch.coords[:, 0] == b
        frames = unpatchify_frames(batch.feats[mask], batch.coords[mask])
        out.append(frames[:1] if kind == "image" else frames)
    return out


def voxel_features(batch: SparseBatch, index: int) -> tuple[Tensor, Tensor]:
    """A 3D item's decoder input: coords [n, 3] (x, y, z) and the first 768 feature values."""
    mask = batch.coords[:, 0] == index
    return batch.coords[mask][:, 2:].long(), batch.feats[mask][:, :VOXEL_FEATURES]
