"""Cost before work: what a request will allocate, computed from what it declares (token coords,
`media` sizes, JSON size and depth) and checked against the limits before anything is built.

Tokens sent to /decode must form the token set /tokenize would have produced for their kind:
the output canvas is sized from the coords and from `media`, so both are bounded here.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from model.config import TEMPORAL_TILE

from .errors import BadRequest, InvalidParameter, PayloadTooLarge
from .media.image import PATCH
from .media.limits import MediaLimits
from .media.video import TUBELET

GRID_3D = 64
MAX_FPS = 1000.0


def parse_json(data: bytes, max_bytes: int, max_depth: int) -> Any:
    """Bytes -> a JSON value, refusing bodies over `max_bytes` and nesting over `max_depth`.
    Meant for a worker thread: a large document must not stall the event loop."""
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"JSON body of {len(data)} bytes exceeds the limit of {max_bytes}", limit=max_bytes)
    try:
        value = json.loads(data)
    except RecursionError:
        raise BadRequest(f"JSON nested deeper than the limit of {max_depth} levels", limit=max_depth) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    if json_depth(value) > max_depth:
        raise BadRequest(f"JSON nested deeper than the limit of {max_depth} levels", limit=max_depth)
    return value


def json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (iterative: no recursion limit to hit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def check_token_set(coords: np.ndarray, kind: str, limits: MediaLimits, where: str) -> tuple[int, int, int]:
    """coords [n, 4] (t, x, y, z) -> the token grid (latent frames, rows, columns).

    Images and videos must be the full grid /tokenize returns (every cell once, z = 0); 3D
    tokens are distinct voxels of the 64^3 grid at t = 1 (as the official code puts them). Everything is bounded by the same
    limits as inputs, so the decoder and the output canvas cannot grow past them."""
    n = coords.shape[0]
    if n == 0:
        raise InvalidParameter(f"{where}: no tokens")
    if kind != "video" and n > limits.max_tokens:  # a video's are counted per tile, below
        raise PayloadTooLarge(f"{where}: {n} tokens, over the limit of {limits.max_tokens} per item",
                              limit=limits.max_tokens)
    if coords.min() < 0:
        raise InvalidParameter(f"{where}: coords must be non-negative")
    t, x, y, z = (coords[:, i] for i in range(4))
    if kind == "3D":
        if (t != 1).any() or coords[:, 1:].max() >= GRID_3D:  # the official 3D tokens sit at t = 1
            raise InvalidParameter(f"{where}: 3D coords need t = 1 and x, y, z in [0, {GRID_3D})",
                                   limit=GRID_3D)
        if n > limits.max_voxels:
            raise PayloadTooLarge(f"{where}: {n} voxels, over the limit of {limits.max_voxels}",
                                  limit=limits.max_voxels)
        _check_distinct(coords, where)
        return 1, GRID_3D, GRID_3D
    if z.any():
        raise InvalidParameter(f"{where}: {kind} coords need z = 0")
    grid = (int(t.max()) + 1, int(x.max()) + 1, int(y.max()) + 1)
    max_cells = limits.max_side // PATCH
    # A video is decoded one tile of latent frames at a time (streamed into the file), so its
    # length is bounded like an input video's, and its tokens per tile like any item's.
    max_latent_frames = 1 if kind == "image" else math.ceil(limits.max_frames / TUBELET)
    if grid[0] > max_latent_frames:
        raise InvalidParameter(f"{where}: {grid[0]} latent frames, over the limit of {max_latent_frames} "
                               f"for a {kind}", limit=max_latent_frames)
    if max(grid[1:]) > max_cells:
        raise InvalidParameter(f"{where}: a token grid of {grid[1]}x{grid[2]} exceeds the canvas limit of "
                               f"{max_cells}x{max_cells} tokens (max_side {limits.max_side} px)", limit=max_cells)
    per_tile = min(grid[0], TEMPORAL_TILE) * grid[1] * grid[2]
    if per_tile > limits.max_tokens:
        raise PayloadTooLarge(f"{where}: {per_tile} tokens in a tile of {min(grid[0], TEMPORAL_TILE)} latent "
                              f"frames, over the limit of {limits.max_tokens} per item", limit=limits.max_tokens)
    if n != math.prod(grid):
        raise InvalidParameter(f"{where}: {n} tokens do not fill their {grid[0]}x{grid[1]}x{grid[2]} grid "
                               "(send every token /tokenize returned)")
    _check_distinct(coords, where)
    return grid


def _check_distinct(coords: np.ndarray, where: str) -> None:
    if len(np.unique(coords, axis=0)) != coords.shape[0]:
        raise InvalidParameter(f"{where}: coords contain duplicates")


def check_media(media: Any, kind: str, grid: tuple[int, int, int], limits: MediaLimits, where: str) -> dict:
    """The `media` object of a /decode item, typed and bounded; unknown keys are dropped.
    Output frames are at most `max_pixels` each and at most the frames the tokens hold."""
    if media is None:
        media = {}
    if not isinstance(media, dict):
        raise InvalidParameter(f"{where}.media must be an object")
    if kind == "3D":
        return {}
    model_h, model_w = grid[1] * PATCH, grid[2] * PATCH
    out: dict[str, Any] = {"model_height": model_h, "model_width": model_w}
    height = _integer(media, "height", where, model_h, 1, limits.max_pixels)
    width = _integer(media, "width", where, model_w, 1, limits.max_pixels)
    if height * width > limits.max_pixels:
        raise InvalidParameter(f"{where}.media: output of {width}x{height} = {height * width} pixels exceeds the "
                               f"limit of {limits.max_pixels}", limit=limits.max_pixels)
    for key, expected in (("model_height", model_h), ("model_width", model_w)):
        if key in media and _integer(media, key, where, expected, 1, limits.max_side) != expected:
            raise InvalidParameter(f"{where}.media.{key} is {media[key]} but the tokens give {expected}")
    out.update(height=height, width=width)
    if kind == "image":
        out["frames"] = 1
        return out
    out["frames"] = _integer(media, "frames", where, grid[0] * TUBELET, 1, grid[0] * TUBELET)
    # Every output frame is resized and encoded (0.43 s a 4096x4096 frame here): a few tokens
    # a frame must not buy hours of work: the video budget, about what the request's time
    # limit can decode, bounds what it may encode too.
    canvas, budget = out["frames"] * height * width, limits.max_video_pixels
    if canvas > budget:
        raise PayloadTooLarge(f"{where}.media: {out['frames']} frames of {width}x{height} = {canvas} output pixels "
                              f"exceed the limit of {budget} (max_video_pixels)", limit=budget)
    fps = media.get("fps", 25.0)
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or not 0 < fps <= MAX_FPS:
        raise InvalidParameter(f"{where}.media.fps must be a number in (0, {MAX_FPS:g}], got {fps!r}", limit=MAX_FPS)
    out["fps"] = float(fps)
    return out


def _integer(media: dict, key: str, where: str, default: int, low: int, high: int) -> int:
    value = media.get(key, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidParameter(f"{where}.media.{key} must be an integer in [{low}, {high}], got {value!r}",
                               limit=high)
    return value
