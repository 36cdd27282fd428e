"""Principal components of 16x16 patches (or 4-frame tubelets): the linear baseline at the
model's budget of 48 values per token, and the warm start of the default model."""

from __future__ import annotations

import numpy as np

from .data import ImageCrops, VideoCrops, training_clips, training_images

PATCH = 16


def to_patches(frames: np.ndarray, tube: int) -> np.ndarray:
    """float [T, H, W, 3] (T a multiple of `tube`) -> [T/tube * H/16 * W/16, tube*16*16*3],
    each row in the tubelet order (t, y, x, rgb) that `model.patchify` uses."""
    t, h, w, _ = frames.shape
    x = frames.reshape(t // tube, tube, h // PATCH, PATCH, w // PATCH, PATCH, 3)
    return x.transpose(0, 2, 4, 1, 3, 5, 6).reshape(-1, tube * PATCH * PATCH * 3)


def from_patches(rows: np.ndarray, shape: tuple[int, ...], tube: int) -> np.ndarray:
    t, h, w, _ = shape
    x = rows.reshape(t // tube, h // PATCH, w // PATCH, tube, PATCH, PATCH, 3)
    return x.transpose(0, 3, 1, 4, 2, 5, 6).reshape(shape)


def to_unit(frames: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [-1, 1]."""
    return frames.astype(np.float32) / 127.5 - 1


def to_uint8(x: np.ndarray) -> np.ndarray:
    """float in [-1, 1] -> uint8 pixels (rounded, clipped)."""
    return np.clip((x + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)


class TokenPCA:
    """`components` principal components of tokens `tube` frames deep, fitted on training data:
    stills (random crops) for tube=1, consecutive frames of the training clips for tube=4."""

    def __init__(self, components: int = 48, tube: int = 1, seed: int = 0):
        self.tube = tube
        if tube == 1:
            data = ImageCrops(training_images(), 128, seed).sample(256).numpy()[:, None]  # [-1, 1]
        else:
            data = VideoCrops(training_clips(), training_images(), 128, 2 * tube, seed).sample(96).numpy()
        rows = np.concatenate([to_patches(d, tube) for d in data])
        self.mean = rows.mean(0)
        _, sv, vt = np.linalg.svd(rows - self.mean, full_matrices=False)
        self.basis = vt[:components]  # [K, tube*768], orthonormal rows
        self.scales = sv[:components] / np.sqrt(len(rows))  # [K] std of each coefficient

    def coefficients(self, rows: np.ndarray) -> np.ndarray:
        """token rows [N, tube*768] -> their K coefficients [N, K]."""
        return (rows - self.mean) @ self.basis.T

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] (tube=1) or [T, H, W, 3] -> the rank-K reconstruction, same shape."""
        x = to_unit(frames)
        x = x[None] if x.ndim == 3 else x
        t = x.shape[0]
        pad = -t % self.tube  # repeat the last frame, as the model's video path does
        if pad:
            x = np.concatenate([x, np.repeat(x[-1:], pad, 0)])
        rows = to_patches(x, self.tube)
        rec = from_patches(self.coefficients(rows) @ self.basis + self.mean, x.shape, self.tube)[:t]
        out = to_uint8(rec)
        return out if frames.ndim == 4 else out[0]
