"""Meshes in with trimesh: PLY, OBJ (+MTL and textures from a zip), GLB/glTF, STL, OFF.
Scenes are flattened into one mesh in world space; colours (vertex, face or UV texture) kept."""

from __future__ import annotations

import io
import re
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
import trimesh
from PIL import Image

from .archive import open_archive
from .errors import CorruptMediaError, UnsupportedMediaError, check_limit
from .limits import MediaLimits

MESH_SUFFIXES = (".obj", ".glb", ".gltf", ".ply", ".stl", ".off")


@dataclass
class ColoredMesh:
    vertices: np.ndarray  # [V, 3] float64
    faces: np.ndarray  # [F, 3] int64
    vertex_colors: np.ndarray | None = None  # [V, 3] uint8
    face_colors: np.ndarray | None = None  # [F, 3] uint8
    uv: np.ndarray | None = None  # [V, 2]
    texture: np.ndarray | None = None  # [H, W, 3] uint8

    def normalized(self) -> "ColoredMesh":
        """Centre the bounding box at the origin and scale its longest side to 1, so the object
        fills [-0.5, 0.5]^3 like the official pipeline's renders."""
        lo, hi = self.vertices.min(0), self.vertices.max(0)
        scale = float((hi - lo).max())
        if not np.isfinite(scale) or scale <= 0:
            raise CorruptMediaError("mesh has zero extent")
        v = (self.vertices - (lo + hi) / 2) / scale
        return ColoredMesh(v, self.faces, self.vertex_colors, self.face_colors, self.uv, self.texture)


def _unzip(data: bytes, limits: MediaLimits) -> tuple[str, bytes, dict[str, bytes]]:
    """The main mesh file of an archive and every file beside it (MTL, textures, buffers)."""
    archive = open_archive(data, limits)
    try:
        names = [n for n in archive.namelist() if not n.endswith("/") and not n.startswith("__MACOSX")]
        meshes = [n for n in names if n.lower().endswith(MESH_SUFFIXES)]
        if not meshes:
            raise UnsupportedMediaError("zip archive holds no mesh file")
        main = sorted(meshes, key=lambda n: MESH_SUFFIXES.index("." + n.lower().rsplit(".", 1)[-1]))[0]
        prefix = main.rsplit("/", 1)[0] + "/" if "/" in main else ""
        files = {n[len(prefix):]: archive.read(n) for n in names if n.startswith(prefix)}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as exc:
        raise CorruptMediaError(f"corrupt zip archive: {exc}") from None
    return main, files[main[len(prefix):]], files


def check_declared_counts(data: bytes, fmt: str, limits: MediaLimits) -> None:
    """Refuse a PLY or OFF whose header declares more vertices or faces than the limits,
    before a parser sizes arrays from it."""
    if fmt == "ply":
        header = data[:4096].split(b"end_header", 1)[0].decode("latin-1")
        counts = dict(re.findall(r"^element\s+(\w+)\s+(\d+)", header, re.MULTILINE))
        vertices, faces = int(counts.get("vertex", 0)), int(counts.get("face", 0))
    elif fmt == "off":
        numbers = re.search(rb"^\s*C?OFF\s+(\d+)\s+(\d+)", data[:4096])
        vertices, faces = (int(numbers.group(1)), int(numbers.group(2))) if numbers else (0, 0)
    else:
        return
    check_limit("declared vertex count", vertices, limits.max_vertices)
    check_limit("declared face count", faces, limits.max_faces)


def load_mesh(data: bytes, fmt: str, limits: MediaLimits = MediaLimits()) -> ColoredMesh:
    check_limit("upload", len(data), limits.max_bytes, "bytes")
    resolver = None
    file_type = fmt
    if fmt == "zip":
        name, data, files = _unzip(data, limits)
        resolver = trimesh.resolvers.ZipResolver(files)  # resolves "./x.mtl" and texture paths
        file_type = name.rsplit(".", 1)[-1].lower()
    check_declared_counts(data, file_type, limits)
    try:
        scene = trimesh.load_scene(io.BytesIO(data), file_type=file_type, resolver=resolver, process=False)
    except Exception as exc:  # noqa: BLE001 - trimesh raises many types on bad input
        raise CorruptMediaError(f"cannot read {file_type} mesh: {type(exc).__name__}: {exc}") from None
    meshes = [g for g in scene.dump() if isinstance(g, trimesh.Trimesh)] if scene.geometry else []
    if not meshes or sum(len(m.faces) for m in meshes) == 0:
        raise CorruptMediaError("the file holds no triangles (point clouds and empty meshes are refused)")
    check_limit("vertex count", sum(len(m.vertices) for m in meshes), limits.max_vertices)
    check_limit("face count", sum(len(m.faces) for m in meshes), limits.max_faces)
    return _merge([_colored(m, limits.max_pixels) for m in meshes])


def _colored(mesh: trimesh.Trimesh, max_pixels: int) -> ColoredMesh:
    v = np.asarray(mesh.vertices, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != 3:
        raise CorruptMediaError(f"mesh vertices are not 3D points (shape {list(v.shape)})")
    if not np.isfinite(v).all():
        raise CorruptMediaError("mesh has NaN or infinite vertex coordinates")
    faces = np.asarray(mesh.faces, dtype=np.int64)
    # Parsers pass indices through as the file states them (process=False keeps them as sent).
    if faces.ndim != 2 or faces.shape[1] != 3 or (faces.size and (faces.min() < 0 or faces.max() >= len(v))):
        raise CorruptMediaError(f"mesh faces index vertices that do not exist ({len(v)} vertices)")
    out = ColoredMesh(v, faces)
    visual = mesh.visual
    kind = getattr(visual, "kind", None)
    if kind == "texture":
        image = _texture_image(visual.material, max_pixels)
        uv = getattr(visual, "uv", None)
        if image is not None and uv is not None and len(uv) == len(v):
            out.uv, out.texture = np.asarray(uv, dtype=np.float64), image
            return out
        base = _material_colour(visual.material)
        out.face_colors = np.tile(base, (len(out.faces), 1))
    elif kind == "vertex":
        out.vertex_colors = _per_row(visual.vertex_colors, len(v))
    elif kind == "face":
        out.face_colors = _per_row(visual.face_colors, len(faces))
    return out


def _per_row(colours, rows: int) -> np.ndarray | None:
    """RGB of one colour per vertex or face; None (the default grey) where the file's count differs."""
    colours = np.asarray(colours)
    if colours.ndim != 2 or colours.shape[0] != rows or colours.shape[1] < 3:
        return None
    return colours[:, :3].astype(np.uint8)


def _texture_image(material, max_pixels: int) -> np.ndarray | None:
    image = getattr(material, "image", None) or getattr(material, "baseColorTexture", None)
    if image is None:
        return None
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    # Textures are opened lazily by trimesh: check the declared size before decoding them.
    check_limit("texture size", image.size[0] * image.size[1], max_pixels, "pixels")
    return np.asarray(image.convert("RGB"))


def _material_colour(material) -> np.ndarray:
    for name in ("main_color", "baseColorFactor", "diffuse"):
        value = getattr(material, name, None)
        if value is not None:
            arr = np.asarray(value, dtype=np.float64).ravel()[:3]
            return (arr * 255 if arr.max() <= 1.0 else arr).astype(np.uint8)
    return np.array([180, 180, 180], np.uint8)


def _merge(parts: list[ColoredMesh]) -> ColoredMesh:
    if len(parts) == 1:
        return parts[0]
    # Mixed colour sources: fall back to per-face colours everywhere (textures sampled at
    # face centroids) so one mesh can hold them all.
    verts, faces, colours, offset = [], [], [], 0
    for p in parts:
        verts.append(p.vertices)
        faces.append(p.faces + offset)
        colours.append(face_colour_of(p))
        offset += len(p.vertices)
    return ColoredMesh(np.concatenate(verts), np.concatenate(faces), face_colors=np.concatenate(colours))


def face_colour_of(mesh: ColoredMesh) -> np.ndarray:
    if mesh.face_colors is not None:
        return mesh.face_colors
    if mesh.vertex_colors is not None:
        return mesh.vertex_colors[mesh.faces].mean(1).astype(np.uint8)
    if mesh.texture is not None:
        uv = mesh.uv[mesh.faces].mean(1)
        return sample_texture(mesh.texture, uv)
    return np.tile(np.array([180, 180, 180], np.uint8), (len(mesh.faces), 1))


def sample_texture(texture: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Nearest texel at uv [n, 2] (v up, repeat wrap) -> uint8 [n, 3]."""
    h, w = texture.shape[:2]
    u = np.mod(uv[:, 0], 1.0)
    v = np.mod(uv[:, 1], 1.0)
    x = np.clip((u * w).astype(np.int64), 0, w - 1)
    y = np.clip(((1 - v) * h).astype(np.int64), 0, h - 1)
    return texture[y, x]
