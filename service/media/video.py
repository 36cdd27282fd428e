"""Video: probe with PyAV, refuse over limits before decoding, decode with frame sampling,
and encode reconstructions to MP4 (H.264) or WebM (VP9) in memory."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from io import BytesIO
from typing import Iterable

import av
import numpy as np

from .detect import VIDEO_FORMATS, sniff
from .errors import CorruptMediaError, MediaOutOfRangeError, MediaTooLargeError, UnsupportedMediaError, check_limit
from .image import Resize, plan_resize, resize_rgb
from .limits import MediaLimits
from .mp4 import faststart

TUBELET = 4  # frames per latent frame
TILE = 16  # frames per temporal tile (4 latent frames), as the official encoder cuts videos


@dataclass(frozen=True)
class VideoInfo:
    container: str
    codec: str
    width: int
    height: int
    fps: float
    duration_s: float
    frames: int  # as declared by the container (estimated from duration x fps when absent)


@dataclass(frozen=True)
class Sampling:
    """Which frames to decode: all (fps None), at a target fps, at most `max_frames`, between times."""

    fps: float | None = None
    max_frames: int | None = None
    start_s: float = 0.0
    end_s: float | None = None


@dataclass
class DecodedVideo:
    frames: np.ndarray  # uint8 [T, h, w, 3] at the model size
    fps: float  # of the decoded (sampled) frames
    info: VideoInfo
    resize: Resize


def _open(data: bytes) -> av.container.InputContainer:
    try:
        return av.open(BytesIO(data), mode="r")
    except (av.error.FFmpegError, ValueError) as exc:
        raise CorruptMediaError(f"cannot open video: {exc}") from None


def probe_video(data: bytes, limits: MediaLimits = MediaLimits()) -> VideoInfo:
    """Container, codec, size, fps, duration and frame count; limits checked here."""
    check_limit("upload", len(data), limits.max_bytes, "bytes")
    modality, fmt = sniff(data)
    if modality != "video" or fmt not in VIDEO_FORMATS:
        raise UnsupportedMediaError(f"expected a video, got {modality} ({fmt})")
    with _open(data) as container:
        if not container.streams.video:
            raise CorruptMediaError("the file holds no video stream")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1e6
        else:
            duration = 0.0
        frames = int(stream.frames or round(duration * fps))
        info = VideoInfo(container.format.name, ctx.name, int(ctx.width), int(ctx.height), fps, duration, frames)
    if info.width <= 0 or info.height <= 0 or info.fps <= 0:
        raise CorruptMediaError(f"video declares size {info.width}x{info.height} at {info.fps} fps")
    check_limit("frame size", info.width * info.height, limits.max_pixels, "pixels")
    check_limit("video duration", round(info.duration_s, 3), limits.max_duration_s, "s")
    return info


def decode_video(data: bytes, limits: MediaLimits = MediaLimits(), sampling: Sampling = Sampling()) -> DecodedVideo:
    """Decode the sampled frames, resized to the model size; memory bounded by max_frames."""
    info = probe_video(data, limits)
    plan = plan_resize(info.height, info.width, limits)
    cap = min(limits.max_frames, sampling.max_frames or limits.max_frames)
    step = 1.0 if not sampling.fps or sampling.fps >= info.fps else info.fps / sampling.fps
    out_fps = info.fps / step
    # The decode below stops at `cap` frames whatever the container claims, so this bound on
    # the model's tokens holds before any frame is decoded.
    check_limit("video tokens", math.ceil(cap / TUBELET) * plan.tokens, limits.max_tokens,
                error=MediaOutOfRangeError)
    frames: list[np.ndarray] = []
    next_pick, index = 0.0, -1
    try:
        with _open(data) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                t = float(frame.pts * frame.time_base) if frame.pts is not None else (index + 1) / info.fps
                index += 1
                if t < sampling.start_s - 1e-6:
                    continue
                if sampling.end_s is not None and t > sampling.end_s + 1e-6:
                    break
                if index < next_pick - 1e-6:
                    continue
                next_pick = index + step
                if len(frames) >= cap:
                    if sampling.max_frames is None and sampling.end_s is None:
                        raise MediaTooLargeError(
                            f"video has more than {cap} frames after sampling; ask for fewer "
                            f"(max_frames, fps, start/end) or raise the limit", limit=cap, actual=cap + 1)
                    break
                frames.append(resize_rgb(frame.to_ndarray(format="rgb24"), plan.model))
    except av.error.FFmpegError as exc:
        if not frames:
            raise CorruptMediaError(f"cannot decode video: {exc}") from None
        # A truncated tail still leaves the decoded prefix usable.
    if not frames:
        raise CorruptMediaError("no frames decoded in the requested range")
    return DecodedVideo(np.stack(frames), out_fps, info, plan)


def _even(n: int) -> int:
    return n + (n % 2)


def encode_video(frames: Iterable[np.ndarray], fps: float, fmt: str = "mp4", crf: int = 18) -> bytes:
    """uint8 frames [H, W, 3] (an array [T, H, W, 3] or any iterable, consumed one frame at a
    time so a caller can produce full-size frames lazily) -> MP4 (H.264, yuv420p, fast start)
    or WebM (VP9), in memory.

    Odd sides are padded by one edge pixel: yuv420p needs even sizes.
    """
    fmt = fmt.lower()
    if fmt not in ("mp4", "webm"):
        raise UnsupportedMediaError(f"video output format {fmt!r} unsupported; choose mp4 or webm")
    rate = Fraction(fps).limit_denominator(1001)
    buf = BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        codec = "libx264" if fmt == "mp4" else "libvpx-vp9"
        stream = container.add_stream(codec, rate=rate)
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"} if fmt == "mp4" else {"crf": "32", "b:v": "0"}
        sized = False
        for frame in frames:
            h, w, _ = frame.shape
            eh, ew = _even(h), _even(w)
            if not sized:
                stream.width, stream.height, sized = ew, eh, True
            if (eh, ew) != (h, w):
                frame = np.pad(frame, ((0, eh - h), (0, ew - w), (0, 0)), mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return faststart(buf.getvalue()) if fmt == "mp4" else buf.getvalue()
