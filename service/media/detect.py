"""Modality and format from content (magic bytes), never from the file name alone."""

from __future__ import annotations

import zipfile
from io import BytesIO
from typing import Literal

from .errors import UnsupportedMediaError

Modality = Literal["image", "video", "mesh", "volume"]

IMAGE_FORMATS = {"png", "jpeg", "webp", "gif", "bmp", "tiff"}
VIDEO_FORMATS = {"mp4", "webm", "avi", "mkv"}
MESH_FORMATS = {"ply", "obj", "glb", "gltf", "stl", "off", "zip"}


def sniff(data: bytes) -> tuple[Modality, str]:
    """(modality, format) of a byte string; UnsupportedMediaError when unknown."""
    head = data[:64]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image", "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image", "jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image", "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image", "gif"
    if head[:2] == b"BM" and len(data) > 26:
        return "image", "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "image", "tiff"
    if head[4:8] == b"ftyp":
        return "video", "mp4"
    if head[:4] == b"\x1aE\xdf\xa3":
        return "video", "webm"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "video", "avi"
    if head[:4] == b"glTF":
        return "mesh", "glb"
    if head[:4] == b"ply\n" or head[:5] == b"ply\r\n":
        return "mesh", "ply"
    if head[:4] == b"PK\x03\x04":
        return _sniff_zip(data)
    if head[:6] == b"\x93NUMPY":
        return "volume", "npy"
    text = head.lstrip()
    if text[:3] == b"OFF" or text[:4] == b"COFF":
        return "mesh", "off"
    if text.startswith(b"solid") and b"facet" in data[:4096]:
        return "mesh", "stl"
    if text.startswith(b"{") and b'"asset"' in data[:65536]:
        return "mesh", "gltf"
    if _looks_like_obj(data[:65536]):
        return "mesh", "obj"
    if _looks_like_binary_stl(data):
        return "mesh", "stl"
    raise UnsupportedMediaError("unrecognised content: not a supported image, video, mesh or volume format")


def _sniff_zip(data: bytes) -> tuple[Modality, str]:
    try:
        names = zipfile.ZipFile(BytesIO(data)).namelist()
    except zipfile.BadZipFile:
        raise UnsupportedMediaError("corrupt zip archive") from None
    lower = [n.lower() for n in names]
    if any(n.endswith((".obj", ".gltf", ".glb", ".ply", ".stl", ".off")) for n in lower):
        return "mesh", "zip"
    if any(n.endswith("transforms.json") for n in lower):
        return "volume", "views"
    if any(n.endswith((".npy",)) for n in lower):
        return "volume", "npz"
    raise UnsupportedMediaError("zip archive holds no mesh, rendered views or packed volume")


def _looks_like_obj(head: bytes) -> bool:
    try:
        text = head.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        return False
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return bool(lines) and sum(ln.startswith(("v ", "vt ", "vn ", "f ", "o ", "g ", "mtllib", "usemtl", "s "))
                               for ln in lines[:50]) >= min(3, len(lines))


def _looks_like_binary_stl(data: bytes) -> bool:
    if len(data) < 84:
        return False
    count = int.from_bytes(data[80:84], "little")
    return len(data) == 84 + 50 * count and count > 0
