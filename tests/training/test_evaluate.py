import numpy as np
import pytest
import torch

from model.metrics import psnr, ssim
from training.evaluate import DISCRETE_BPP, jpeg_at, native, square_256
from training.pca import TokenPCA, from_patches, to_patches
from tests import assets


def _img():
    from PIL import Image

    return np.asarray(Image.open(assets.image("coffee.png")).convert("RGB"))


def test_views_follow_the_stated_geometry():
    img = _img()  # 400 x 600
    assert square_256(img).shape == (256, 256, 3)
    assert native(img).shape == (400, 592, 3)


def test_jpeg_baseline_respects_the_bit_budget():
    view = square_256(_img())
    decoded, rate = jpeg_at(view, DISCRETE_BPP)
    assert rate <= DISCRETE_BPP and decoded.shape == view.shape
    assert 15 < psnr(view, decoded) < 40


def test_token_rows_round_trip_in_the_model_order():
    from model.patchify import patchify_frames

    frames = np.random.default_rng(0).uniform(-1, 1, (8, 32, 48, 3)).astype(np.float32)
    rows = to_patches(frames, 4)
    feats, _ = patchify_frames(torch.from_numpy(frames))
    np.testing.assert_array_equal(rows, feats.numpy())  # same tubelet layout as the model's tokens
    np.testing.assert_array_equal(from_patches(rows, frames.shape, 4), frames)


def test_pca_baseline_is_a_real_projection():
    pca = TokenPCA(components=48)
    view = square_256(_img())
    once = pca(view)
    assert pca.basis.shape == (48, 768)
    np.testing.assert_allclose(pca.basis @ pca.basis.T, np.eye(48), atol=1e-4)
    assert psnr(view, once) > 18 and ssim(view, once) > 0.4
    assert psnr(once, pca(once)) > 45  # projecting twice changes (almost) nothing


@pytest.mark.slow
def test_full_evaluation_of_the_shipped_default(tmp_path):
    from training.evaluate import evaluate, to_markdown
    from service.worker.loader import DEFAULT_CHECKPOINT

    result = evaluate(DEFAULT_CHECKPOINT, frames=8)
    text = to_markdown(result)
    assert "image 256x256" in text and "video (per frame)" in text


def test_tubelet_pca_spends_48_values_per_4_frames():
    from training.data import HELD_OUT_CLIPS, clip_frames, clip_path

    pca = TokenPCA(components=48, tube=4)
    assert pca.basis.shape == (48, 3072)
    clip = np.stack(clip_frames(clip_path(HELD_OUT_CLIPS[0]), every=1, limit=6))[:, :128, :128]
    rec = pca(clip)  # 6 frames: the last tubelet is padded by repeating the last frame
    assert rec.shape == clip.shape
    assert 20 < np.mean([psnr(a, b) for a, b in zip(clip, rec)]) < 40
