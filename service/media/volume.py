"""Already-packed 3D inputs: coords [n, 3] (x, y, z) on the 64^3 grid and feats [n, 768]
(16x16 RGB patches, uint8 or float in [0, 1]), as an .npz archive or a safetensors file."""

from __future__ import annotations

import io
import math
import zipfile
import zlib

import numpy as np

from .archive import open_archive
from .errors import CorruptMediaError, check_limit
from .limits import MediaLimits

GRID = 64
FEATURES = 768


def check_volume(coords: np.ndarray, feats: np.ndarray, limits: MediaLimits) -> tuple[np.ndarray, np.ndarray]:
    if coords.ndim != 2 or coords.shape[1] != 3:
        raise CorruptMediaError(f"coords must be [n, 3] (x, y, z), got shape {list(coords.shape)}")
    if feats.ndim != 2 or feats.shape[1] != FEATURES:
        raise CorruptMediaError(f"feats must be [n, {FEATURES}], got shape {list(feats.shape)}")
    if coords.shape[0] != feats.shape[0] or coords.shape[0] == 0:
        raise CorruptMediaError(f"{coords.shape[0]} coords but {feats.shape[0]} feature rows")
    check_limit("occupied voxels", coords.shape[0], limits.max_voxels)
    if not np.issubdtype(coords.dtype, np.integer):
        raise CorruptMediaError(f"coords must be integers, got {coords.dtype}")
    if coords.min() < 0 or coords.max() >= GRID:
        raise CorruptMediaError(f"coords must lie in [0, {GRID})")
    if len(np.unique(coords, axis=0)) != coords.shape[0]:
        raise CorruptMediaError("coords contain duplicate voxels")
    if feats.dtype == np.uint8:
        feats = feats.astype(np.float32) / 255.0
    else:
        feats = feats.astype(np.float32)
        if not np.isfinite(feats).all() or feats.min() < 0 or feats.max() > 1:
            raise CorruptMediaError("float feats must be finite and in [0, 1]")
    return coords.astype(np.int64), feats


def check_npz_headers(data: bytes, limits: MediaLimits) -> None:
    """Read each member's .npy header (shape and dtype) and check what it would allocate,
    before np.load sizes an array from it: a small npz of zeros can declare gigabytes."""
    archive = open_archive(data, limits)
    for member in archive.infolist():
        if not member.filename.endswith(".npy"):
            continue
        try:
            with archive.open(member) as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(f)
        except (ValueError, OSError, zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise CorruptMediaError(f"cannot read npz member {member.filename!r}: {exc}") from None
        if dtype.hasobject:
            raise CorruptMediaError(f"npz member {member.filename!r} holds Python objects")
        rows = shape[0] if shape else 1
        check_limit(f"{member.filename} rows", rows, limits.max_voxels)
        check_limit(f"{member.filename} size", math.prod(shape) * dtype.itemsize, limits.max_inflated_bytes, "bytes")


def load_npz(data: bytes, limits: MediaLimits) -> tuple[np.ndarray, np.ndarray]:
    check_limit("upload", len(data), limits.max_bytes, "bytes")
    check_npz_headers(data, limits)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            if "coords" not in archive or "feats" not in archive:
                raise CorruptMediaError(f"npz needs arrays 'coords' and 'feats', has {sorted(archive.files)}")
            coords, feats = archive["coords"], archive["feats"]
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise CorruptMediaError(f"cannot read npz volume: {exc}") from None
    return check_volume(coords, feats, limits)


def to_npz(coords: np.ndarray, feats: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, coords=coords.astype(np.int32), feats=feats)
    return buf.getvalue()
