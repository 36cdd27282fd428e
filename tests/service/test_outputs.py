"""An image's file and round-trip score from one rebuild of its pixels equal the two-step path."""

from service.outputs import render, render_image
from service.pipeline import Options, preprocess, round_trip_psnr
from service.settings import Settings
from service.worker.backends import LocalBackend
from service.worker.jobs import Job
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
