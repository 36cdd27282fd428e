"""The PCA warm start: a freshly initialised AToken reconstructs like the PCA it was built from."""

import numpy as np
import torch

from model.autoencoder import AToken
from model.config import get_variant
from model.metrics import psnr
from model.patchify import frames_to_sparse, sparse_to_frames
from training.pca import to_patches
from training.warm_start import pca_warm_start
from tests import assets


class _PCA:
    """48 components of one training picture's patches (a small, fast stand-in fit)."""

    tube = 1

    def __init__(self, img: np.ndarray):
        rows = to_patches(img[None].astype(np.float32) / 127.5 - 1, 1)
        self.mean = rows.mean(0)
        _, sv, vt = np.linalg.svd(rows - self.mean, full_matrices=False)
        self.basis, self.scales = vt[:48], sv[:48] / np.sqrt(len(rows))

    def coefficients(self, rows: np.ndarray) -> np.ndarray:
        return (rows - self.mean) @ self.basis.T

    def __call__(self, img: np.ndarray) -> np.ndarray:
        x = img[None].astype(np.float32) / 127.5 - 1
        rows = to_patches(x, 1)
        from training.pca import from_patches

        rec = from_patches((rows - self.mean) @ self.basis.T @ self.basis + self.mean, x.shape, 1)[0]
        return np.clip((rec + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def _picture(name: str, size: int = 128) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(assets.image(name)).convert("RGB"))[:size, :size]


def _roundtrip(model: AToken, img: np.ndarray, video: bool = False) -> np.ndarray:
    x = torch.from_numpy(img.astype(np.float32) / 127.5 - 1)
    batch, _ = frames_to_sparse([x])
    with torch.no_grad():
        out = model(batch)
    frames = sparse_to_frames(batch.with_feats(out["reconstruction"]))[0]  # [T, 3, H, W]
    return ((frames.clamp(-1, 1) + 1) * 127.5 + 0.5).clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def test_warm_started_model_equals_its_pca():
    torch.manual_seed(0)
    pca = _PCA(_picture("chelsea.png", 256))
    model = AToken(get_variant("tiny"))
    pca_warm_start(model, pca)
    model.eval()
    held_out = _picture("coffee.png")
    ours, linear = _roundtrip(model, held_out)[0], pca(held_out)
    assert psnr(linear, ours) > 38  # the same reconstruction, up to the blocks' small start
    assert abs(psnr(held_out, ours) - psnr(held_out, linear)) < 0.5


def test_warm_start_writes_still_tubelets_for_video():
    torch.manual_seed(0)
    model = AToken(get_variant("tiny"))
    pca_warm_start(model, _PCA(_picture("chelsea.png", 256)))
    model.eval()
    still = np.repeat(_picture("coffee.png")[None], 4, 0)
    frames = _roundtrip(model, still, video=True)
    assert frames.shape == still.shape
    assert psnr(frames[0], frames[3]) > 45  # every frame of a tubelet starts as frame 0's reconstruction


def test_context_warm_start_is_the_least_squares_context_decoder():
    """The neighbour heads fetch exactly their neighbour: the fresh model reproduces the
    closed-form context decoder, which beats the plain PCA code it extends."""
    from training.context import fit_context_decoder

    torch.manual_seed(0)
    pca = _PCA(_picture("chelsea.png", 256))
    context = fit_context_decoder(pca, crops=60, size=128)
    model = AToken(get_variant("tiny"))
    pca_warm_start(model, pca, context)
    model.eval()
    held_out = _picture("coffee.png", 192)[:, :160]  # not square: rows and columns must not swap
    ours, closed_form = _roundtrip(model, held_out)[0], context.reconstruct(pca, held_out)
    assert psnr(closed_form, ours) > 38
    assert psnr(held_out, closed_form) > psnr(held_out, pca(held_out)) + 0.1


def test_context_parameters_name_the_neighbour_heads():
    from training.warm_start import context_parameters

    model = AToken(get_variant("tiny"))
    names = context_parameters(model)
    assert names == ("decoder.blocks.0.attn.", "decoder.blocks.1.attn.")
    assert all(any(n.startswith(p) for n, _ in model.named_parameters()) for p in names)
