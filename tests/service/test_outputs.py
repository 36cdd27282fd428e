"""Rendered outputs: one rebuild of an image's pixels for file and score; pixel results from the
worker render exactly as float tubelets."""

import io

import numpy as np
import torch

from service.outputs import render, render_image
from service.inputs import Options
from service.pipeline import Item, model_size_frames, preprocess, round_trip_psnr, tubelets_to_frames
from service.settings import Settings
from service.worker.backends import LocalBackend
from service.worker.jobs import Job, pixel_patches, reconstruction_pixels
from tests import assets


def test_render_image_equals_render_and_round_trip_psnr():
    settings = Settings(variant="tiny", max_side=128)
    backend = LocalBackend(settings.model_spec)
    backend.start()
    item = preprocess(assets.image("rocket.jpg").read_bytes(), Options(), settings.limits)
    result = backend.run([Job(0, "reconstruct", batch=item.batch)])[0]
    for fmt in ("png", "webp"):
        data, score = render_image(item, result, fmt)
        assert data == render(item.kind, result.tubelets, item.batch.coords, item.media, None, fmt)
        assert score == round_trip_psnr(item, result)


def test_pixel_results_render_exactly_as_float_tubelets():
    """Job.pixels: the worker sends back only the uint8 pixels the front end would make (an
    image's frame 0; every frame of a video), and everything rendered from them is the same."""
    settings = Settings(variant="tiny", max_side=128)
    backend = LocalBackend(settings.model_spec)
    backend.start()
    image = preprocess(assets.image("rocket.jpg").read_bytes(), Options(), settings.limits)
    frames = np.stack([np.roll(image.reference[0][:64, :96], 5 * t, axis=1) for t in range(8)])
    video = Item("video", "video", pixel_patches(frames), {"height": 72, "width": 100, "frames": 8, "fps": 8.0},
                 frames)
    for item in (image, video):
        kind = item.kind
        as_float, as_pixels = backend.run([Job(0, "reconstruct", batch=item.batch),
                                           Job(1, "reconstruct", batch=item.batch, pixels=True)])
        assert as_pixels.tubelets.dtype == torch.uint8
        assert as_pixels.tubelets.shape == (as_float.tubelets.shape[0], 768 if kind == "image" else 3072)
        # the frames a video's encoder is fed: libx264 itself does not write the same bytes for
        # the same frames every time (2-4 variants in 60 encodes here)
        if kind == "image":
            assert render(kind, as_pixels.tubelets, item.batch.coords, item.media, None, "png") == \
                render(kind, as_float.tubelets, item.batch.coords, item.media, None, "png")
        else:
            as_frames = [np.stack(list(tubelets_to_frames(r.tubelets, item.batch.coords, kind, item.media)))
                         for r in (as_pixels, as_float)]
            assert np.array_equal(*as_frames)
        assert round_trip_psnr(item, as_pixels) == round_trip_psnr(item, as_float)
        if kind == "image":
            assert render_image(item, as_pixels, "png") == render_image(item, as_float, "png")
    # 3D reconstructions stay float whatever the flag: their consumers (PLY, NPZ) need the values
    buf = io.BytesIO()
    coords = np.unique(np.random.default_rng(0).integers(10, 30, (40, 3)), axis=0)
    np.savez(buf, coords=coords, feats=np.full((len(coords), 768), 128, np.uint8))
    volume = preprocess(buf.getvalue(), Options(), settings.limits)
    assert backend.run([Job(2, "reconstruct", batch=volume.batch, pixels=True)])[0].tubelets.dtype == torch.float32


def test_pixels_fill_places_no_token_covers_like_float_zeros():
    """Tokens sent to /decode may leave holes in the grid: as pixels they read as a float 0 would."""
    coords = torch.tensor([[0, 0, 0, 0, 0], [0, 0, 1, 1, 0], [0, 1, 0, 1, 0]], dtype=torch.int32)
    tubelets = torch.rand(3, 3072) * 2.4 - 1.2  # some values outside [-1, 1]: clamped alike
    for kind in ("image", "video"):
        pixels = reconstruction_pixels(tubelets, kind)
        np.testing.assert_array_equal(model_size_frames(pixels, coords, kind, 8),
                                      model_size_frames(tubelets, coords, kind, 8))
