import time
from io import BytesIO

import numpy as np
import pytest
from PIL import Image

from service.media.detect import sniff
from service.media.errors import CorruptMediaError, MediaTooLargeError, UnsupportedMediaError
from service.media.image import decode_image, encode_image, load_for_model, plan_resize, resize_rgb
from service.media.limits import MediaLimits
from tests import assets


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = BytesIO()
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name,shape", [("astronaut.png", (512, 512, 3)), ("camera.png", (512, 512, 3)),
                                        ("rocket.jpg", (427, 640, 3)), ("logo.png", (500, 500, 3))])
def test_real_images_decode_to_rgb(name, shape):
    pixels = decode_image(assets.image(name).read_bytes())
    assert pixels.dtype == np.uint8 and pixels.shape == shape


def test_gif_first_frame_and_multipage_tiff():
    gif = decode_image(assets.image("no_time_for_that_tiny.gif").read_bytes())
    assert gif.ndim == 3 and gif.shape[2] == 3
    tif = decode_image(assets.image("multipage.tif").read_bytes())
    assert tif.shape == (15, 10, 3)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_an_animation_is_read_as_its_first_frame(fmt):
    """An animated GIF or WebP is a still: its first frame, not a video of its frames."""
    frames = [Image.new("RGB", (32, 24), colour) for colour in ((200, 0, 0), (0, 200, 0), (0, 0, 200))]
    buf = BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=50, lossless=True)
    assert sniff(buf.getvalue())[0] == "image"
    assert (decode_image(buf.getvalue()) == np.asarray(frames[0])).all()


def test_alpha_is_composited_on_the_background():
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 3] = 0  # fully transparent
    data = _png(rgba, "RGBA")
    assert (decode_image(data, background=(10, 20, 30)) == [10, 20, 30]).all()


def test_sixteen_bit_greyscale_is_scaled():
    arr = np.full((16, 16), 65535, np.uint16)
    buf = BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    assert (decode_image(buf.getvalue()) == 255).all()


def test_exif_orientation_is_applied():
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255
    image = Image.fromarray(arr)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = BytesIO()
    image.save(buf, "JPEG", exif=exif.tobytes(), quality=100)
    out = decode_image(buf.getvalue())
    assert out.shape == (40, 20, 3)


def test_cmyk_jpeg_converts():
    buf = BytesIO()
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(buf, "JPEG")
    out = decode_image(buf.getvalue())
    assert out.shape == (32, 32, 3) and out[..., 0].mean() > 200 and out[..., 1].mean() < 60


def test_resolution_policy():
    assert plan_resize(512, 512, MediaLimits(max_side=256)).model == (256, 256)
    assert plan_resize(427, 640, MediaLimits(max_side=1024)).model == (432, 640)
    assert plan_resize(10, 30, MediaLimits()).model == (16, 48)
    assert plan_resize(2000, 100, MediaLimits(max_side=512)).model == (512, 32)


def test_load_for_model_is_reversible_in_size():
    values, plan = load_for_model(assets.image("rocket.jpg").read_bytes())
    assert values.shape == (432, 640, 3) and values.min() >= -1 and values.max() <= 1
    back = resize_rgb(((values + 1) * 127.5).astype(np.uint8), plan.original)
    assert back.shape[:2] == (427, 640)


@pytest.mark.parametrize("fmt,magic", [("png", b"\x89PNG"), ("jpeg", b"\xff\xd8"), ("webp", b"RIFF")])
def test_encode_formats_round_trip(fmt, magic):
    pixels = decode_image(assets.image("chelsea.png").read_bytes())
    data = encode_image(pixels, fmt)
    assert data.startswith(magic)
    again = decode_image(data)
    assert again.shape == pixels.shape
    if fmt == "png":
        assert np.array_equal(again, pixels)


def _fast(fn, *args, **kw):
    start = time.perf_counter()
    try:
        fn(*args, **kw)
    finally:
        assert time.perf_counter() - start < 1.0


def test_decompression_bomb_is_refused_from_the_header():
    # A 20000x20000 single-colour PNG compresses to a few hundred KB; refused before decoding.
    header = Image.new("L", (20000, 20000))
    buf = BytesIO()
    header.save(buf, "PNG", optimize=False, compress_level=9)
    data = buf.getvalue()
    assert len(data) < 2_000_000
    with pytest.raises(MediaTooLargeError) as err:
        _fast(decode_image, data)
    assert err.value.limit == MediaLimits().max_pixels and err.value.actual == 20000 * 20000


def test_bytes_limit():
    with pytest.raises(MediaTooLargeError, match="over the limit"):
        decode_image(assets.image("astronaut.png").read_bytes(), MediaLimits(max_bytes=1000))


@pytest.mark.parametrize("data,error", [
    (b"", UnsupportedMediaError),
    (b"hello world, not an image", UnsupportedMediaError),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, CorruptMediaError),
    (b"\xff\xd8\xff\xe0" + b"\x13" * 100, CorruptMediaError),
])
def test_garbage_is_refused_with_a_typed_error(data, error):
    with pytest.raises(error):
        _fast(decode_image, data)


def test_truncated_png_is_refused():
    data = assets.image("astronaut.png").read_bytes()
    with pytest.raises(CorruptMediaError, match="truncated|corrupt"):
        _fast(decode_image, data[: len(data) // 2])


def test_disguised_format_is_refused():
    # A video handed to the image decoder.
    with pytest.raises(UnsupportedMediaError, match="expected an image"):
        decode_image(assets.video("carphone_distorted.mp4").read_bytes())


def test_sniff_detects_by_content():
    assert sniff(assets.image("rocket.jpg").read_bytes()) == ("image", "jpeg")
    assert sniff(assets.video("bikes.mp4").read_bytes()) == ("video", "mp4")


def _large_jpeg(width: int, height: int, orientation: int = 1) -> bytes:
    photo = Image.open(assets.image("astronaut.png")).convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    exif = photo.getexif()
    if orientation != 1:
        exif[0x0112] = orientation
    buf = BytesIO()
    photo.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_for_the_model():
    """A JPEG more than twice the model size is decoded at libjpeg's DCT scale that keeps at
    least twice the model size per side: the model sees (nearly) the same pixels, and the
    record keeps the full size that a reconstruction is returned at."""
    from service.media.image import for_model

    limits = MediaLimits(max_side=512)
    data = _large_jpeg(4000, 3000)
    assert decode_image(data, limits, at_least=1024).shape == (1500, 2000, 3)  # 1/2: 1/4 would be 750x1000
    pixels, plan = for_model(data, limits)
    full = resize_rgb(decode_image(data, limits), plan.model)
    assert plan.original == (3000, 4000) and pixels.shape == full.shape == (384, 512, 3)
    diff = np.abs(pixels.astype(int) - full.astype(int))
    assert diff.max() <= 4 and diff.mean() < 0.5
    # EXIF orientation: the record and the pixels are the upright picture's.
    rotated = _large_jpeg(4000, 3000, orientation=6)
    pixels, plan = for_model(rotated, limits)
    assert plan.original == (4000, 3000) and pixels.shape == (512, 384, 3)
    assert np.abs(pixels.astype(int) - resize_rgb(decode_image(rotated, limits), plan.model)).max() <= 4
    # Small images are decoded whole: the same pixels as before.
    small = _large_jpeg(800, 600)
    pixels, plan = for_model(small, limits)
    assert np.array_equal(pixels, resize_rgb(decode_image(small, limits), plan.model))
