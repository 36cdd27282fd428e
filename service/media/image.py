"""Images: header-first limits, decoding to RGB, the resolution policy, and encoding.

Resolution policy (documented in docs/media.md): keep the aspect ratio; scale down so the
longer side is at most `max_side` (never up, except to bring the shorter side towards
`min_side`, and never so far that the longer side passes `max_side`); round each side to the
nearest multiple of 16 (at least 16). The model then sees no centre crop. `Resize` records
the original size so a reconstruction is resized back to it. Sizes come from the header, so
the token count is known (and checked) before a pixel is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .detect import IMAGE_FORMATS, sniff
from .errors import CorruptMediaError, MediaOutOfRangeError, UnsupportedMediaError, check_limit
from .limits import MediaLimits

PATCH = 16
# Our own limit (MediaLimits.max_pixels, read from the header before any pixel is decoded)
# is the guard; Pillow's global one would refuse large but legitimate configured limits and
# report bombs without the limit that applies.
Image.MAX_IMAGE_PIXELS = None
PIL_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff",
               "MPO": "jpeg"}
ENCODE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
MIME = {"png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg", "webp": "image/webp"}


@dataclass(frozen=True)
class Resize:
    """Original and model sizes, (height, width)."""

    original: tuple[int, int]
    model: tuple[int, int]


    @property
    def tokens(self) -> int:
        """Tokens per latent frame at the model size."""
        return (self.model[0] // PATCH) * (self.model[1] // PATCH)


def plan_resize(height: int, width: int, limits: MediaLimits) -> Resize:
    """The model size for a declared size; refuses extreme aspect ratios and token counts."""
    if height <= 0 or width <= 0:
        raise CorruptMediaError(f"declared size {width}x{height} is empty")
    check_limit("aspect ratio", round(max(height, width) / min(height, width), 2), limits.max_aspect,
                error=MediaOutOfRangeError)
    longest = limits.max_side / max(height, width)
    scale = min(1.0, longest)
    if min(height, width) * scale < limits.min_side:
        # Tiny images grow towards min_side, but a thin strip never grows past max_side: the
        # upscale that once turned a 1x60000 PNG into 100,000 tokens.
        scale = min(limits.min_side / min(height, width), longest)

    def side(n: int) -> int:
        return max(PATCH, int(round(n * scale / PATCH)) * PATCH)

    plan = Resize((height, width), (side(height), side(width)))
    check_limit("tokens per frame", plan.tokens, limits.max_tokens, error=MediaOutOfRangeError)
    return plan


# Shrinking by 4x or more, Pillow first averages whole blocks down to at least twice the
# target, then applies Lanczos: a 3840x2160 video frame to 512x288 in 15 ms instead of 59,
# within 2 levels (0.2 on average) of Lanczos alone. Smaller factors are Lanczos alone.
REDUCING_GAP = 2.0


def resize_rgb(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [h, w, 3] (Lanczos; identity when the size already matches)."""
    if pixels.shape[:2] == tuple(size):
        return pixels
    image = Image.fromarray(pixels).resize((size[1], size[0]), Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP)
    return np.asarray(image)


def probe_image(data: bytes, limits: MediaLimits) -> Image.Image:
    """Open lazily and check bytes, format and declared pixel count before decoding."""
    check_limit("upload", len(data), limits.max_bytes, "bytes")
    modality, fmt = sniff(data)
    if modality != "image" or fmt not in IMAGE_FORMATS:
        raise UnsupportedMediaError(f"expected an image, got {modality} ({fmt})")
    try:
        image = Image.open(BytesIO(data))
    except UnidentifiedImageError as exc:
        raise CorruptMediaError(f"cannot read image header: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise CorruptMediaError(f"corrupt image header: {exc}") from None
    if PIL_FORMATS.get(image.format or "") != fmt:
        raise UnsupportedMediaError(f"content looks like {fmt} but decodes as {image.format}")
    width, height = image.size
    if width <= 0 or height <= 0:
        raise CorruptMediaError(f"image declares an empty size {width}x{height}")
    check_limit("image size", width * height, limits.max_pixels, "pixels")
    return image


def decode_image(data: bytes, limits: MediaLimits = MediaLimits(),
                 background: tuple[int, int, int] = (255, 255, 255), at_least: int | None = None) -> np.ndarray:
    """Bytes -> uint8 [H, W, 3]: EXIF orientation applied, any mode converted to RGB,
    alpha composited over `background`; an animation or a multi-page TIFF gives its first
    frame. `at_least`: only a copy to be resized down is wanted, with both sides at least
    this; a JPEG larger than that is decoded at libjpeg's 1/2, 1/4 or 1/8 scale (its DCT
    scaling), whatever keeps it so."""
    return _decoded(probe_image(data, limits), background, at_least)[0]


def _decoded(image: Image.Image, background: tuple[int, int, int], at_least: int | None) -> tuple[np.ndarray, bool]:
    """(decode_image's pixels from a probed image, whether EXIF orientation swapped its sides)."""
    try:
        image.seek(0)
        if at_least:
            image.draft("RGB", (at_least, at_least))  # JPEG only; other formats ignore it
        image.load()
        stored = image.size
        ImageOps.exif_transpose(image, in_place=True)  # in place: otherwise a copy of every image
        return to_rgb(image, background), image.size != stored
    except (OSError, SyntaxError, ValueError) as exc:
        raise CorruptMediaError(f"corrupt or truncated image: {exc}") from None


def to_rgb(image: Image.Image, background: tuple[int, int, int]) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        image = Image.alpha_composite(canvas, rgba)
    return np.ascontiguousarray(np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8))


# zlib level 1: a 256x256 photograph encodes in half the time of level 6 (14 vs 27 ms here)
# for 8% more bytes (131 vs 121 KB); level 0 is faster again but 62% larger (docs/media.md).
PNG_COMPRESS_LEVEL = 1


def encode_image(pixels: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    """uint8 [H, W, 3] -> PNG / JPEG / WebP bytes."""
    fmt = fmt.lower()
    if fmt not in ENCODE_FORMATS:
        raise UnsupportedMediaError(f"image output format {fmt!r} unsupported; choose png, jpeg or webp")
    buf = BytesIO()
    options = {"quality": quality} if fmt != "png" else {"compress_level": PNG_COMPRESS_LEVEL}
    Image.fromarray(pixels).save(buf, ENCODE_FORMATS[fmt], **options)
    return buf.getvalue()


def to_model_range(pixels: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1] (`x / 255 * 2 - 1`, as the official README)."""
    return pixels.astype(np.float32) / 127.5 - 1.0


def from_model_range(values: np.ndarray) -> np.ndarray:
    """float in [-1, 1] -> uint8 (rounded, clipped)."""
    return np.clip((values + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


# A large JPEG is decoded at a reduced DCT scale that keeps at least this many times the model
# size on each side, then Lanczos-resized: a 4000x3000 photograph to 384x512 in 47 ms instead
# of 170, its pixels within 3 levels (0.17 on average) of decoding in full (docs/media.md).
DRAFT_MARGIN = 2


def for_model(data: bytes, limits: MediaLimits = MediaLimits(),
              background: tuple[int, int, int] = (255, 255, 255)) -> tuple[np.ndarray, Resize]:
    """Bytes -> uint8 [h, w, 3] at the model size, and the resize record (the original size
    from the header: a large JPEG is decoded smaller, see DRAFT_MARGIN). Aspect and tokens
    are refused from the header, before decoding."""
    image = probe_image(data, limits)
    width, height = image.size  # as stored; EXIF orientation may swap them
    longest = max(plan_resize(height, width, limits).model)  # the same either way round
    pixels, swapped = _decoded(image, background, DRAFT_MARGIN * longest)
    plan = plan_resize(*((width, height) if swapped else (height, width)), limits)
    return resize_rgb(pixels, plan.model), plan


def load_for_model(data: bytes, limits: MediaLimits = MediaLimits(),
                   background: tuple[int, int, int] = (255, 255, 255)) -> tuple[np.ndarray, Resize]:
    """Bytes -> float32 [h, w, 3] in [-1, 1] at the model size, and the resize record."""
    pixels, plan = for_model(data, limits, background)
    return to_model_range(pixels), plan
