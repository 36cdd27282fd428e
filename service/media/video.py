"""Video: probe with PyAV, refuse over limits before decoding, decode with frame sampling one
frame at a time (`plan_video` + `iter_frames`: memory does not grow with the clip's length),
and encode reconstructions to MP4 (H.264) or WebM (VP9), in memory or frame by frame to a file
with the source's audio copied (`VideoWriter`)."""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from fractions import Fraction
from io import BytesIO
from typing import Iterable, Iterator

import av
import numpy as np

from .detect import VIDEO_FORMATS, sniff
from .errors import CorruptMediaError, MediaOutOfRangeError, MediaTooLargeError, UnsupportedMediaError, check_limit
from .image import Resize, plan_resize, resize_rgb
from .limits import MediaLimits
from .mp4 import faststart

TUBELET = 4  # frames per latent frame
TILE = 16  # frames per temporal tile (4 latent frames), as the official encoder cuts videos
# A frame decoded only to be dropped (before `start`, between fps samples) costs the decoder
# alone; a kept frame is also converted to RGB and resized. On the packaged clips decoding ran
# at 0.5-1.1 billion pixels a second and all three at 60-95 million: a dropped frame counts an
# eighth of its pixels against the limit.
DROPPED_SHARE = 8
# Whatever its size, a frame costs the decoder's own per-frame work: 38 us for a 16x16 frame
# here, about what this many source pixels of a kept frame cost. Without this floor a 64 MB
# file of tiny frames (13 bytes each) would buy minutes of decoding within the pixel budget.
FRAME_FLOOR = 4096


@dataclass(frozen=True)
class VideoInfo:
    container: str
    codec: str
    width: int
    height: int
    fps: float
    duration_s: float
    frames: int  # as declared by the container (estimated from duration x fps when absent)
    audio: str | None = None  # codec of the first audio stream, if any


@dataclass(frozen=True)
class Sampling:
    """Which frames to decode: all (fps None), at a target fps, at most `max_frames`, between times."""

    fps: float | None = None
    max_frames: int | None = None
    start_s: float = 0.0
    end_s: float | None = None

    @property
    def bounded(self) -> bool:
        """Whether the caller bounded the frames (a count or an end): else only the limits do,
        and a stream holding more than its header declares is an error, not an end."""
        return self.max_frames is not None or self.end_s is not None


@dataclass
class DecodedVideo:
    frames: np.ndarray  # uint8 [T, h, w, 3] at the model size
    fps: float  # of the decoded (sampled) frames
    info: VideoInfo
    resize: Resize


Source = bytes | str  # the file's bytes, or its path (a large upload kept on disk)


def _open(data: Source) -> av.container.InputContainer:
    try:
        return av.open(data if isinstance(data, str) else BytesIO(data), mode="r")
    except (av.error.FFmpegError, ValueError) as exc:
        raise CorruptMediaError(f"cannot open video: {exc}") from None


def _size_and_head(data: Source) -> tuple[int, bytes]:
    if isinstance(data, str):
        with open(data, "rb") as f:
            return os.path.getsize(data), f.read(4096)
    return len(data), data


def probe_video(data: Source, limits: MediaLimits = MediaLimits()) -> VideoInfo:
    """Container, codec, size, fps, duration and frame count; limits checked here."""
    size, head = _size_and_head(data)
    check_limit("upload", size, limits.max_bytes, "bytes")
    modality, fmt = sniff(head)
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
        audio = container.streams.audio[0].codec_context.name if container.streams.audio else None
        info = VideoInfo(container.format.name, ctx.name, int(ctx.width), int(ctx.height), fps, duration, frames,
                         audio)
    if info.width <= 0 or info.height <= 0 or info.fps <= 0:
        raise CorruptMediaError(f"video declares size {info.width}x{info.height} at {info.fps} fps")
    check_limit("frame size", info.width * info.height, limits.max_pixels, "pixels")
    check_limit("video duration", round(info.duration_s, 3), limits.max_duration_s, "s")
    return info


@dataclass(frozen=True)
class VideoPlan:
    """What decoding will produce, from the header alone: checked before a frame is decoded."""

    info: VideoInfo
    resize: Resize
    sampling: Sampling
    step: float  # source frames per kept frame
    fps: float  # of the kept frames
    cap: int  # most frames kept
    expected: int  # frames the declaration promises after sampling (the progress total)
    max_work: int  # decoding work allowed (`decoding_work`), held to while decoding too
    work: int  # decoding work planned: at least what decoding the plan's frames counts

    @property
    def tile_tokens(self) -> int:
        return TILE // TUBELET * self.resize.tokens

    @property
    def tiles(self) -> int:
        return max(1, math.ceil(self.expected / TILE))


def plan_video(data: Source, limits: MediaLimits = MediaLimits(), sampling: Sampling = Sampling()) -> VideoPlan:
    info = probe_video(data, limits)
    plan = plan_resize(info.height, info.width, limits)
    cap = min(limits.max_frames, sampling.max_frames or limits.max_frames)
    step = 1.0 if not sampling.fps or sampling.fps >= info.fps else info.fps / sampling.fps
    if info.duration_s and sampling.start_s >= info.duration_s:
        raise MediaOutOfRangeError(f"start ({sampling.start_s:g} s) is at or past the video's end "
                                   f"({info.duration_s:.2f} s)", limit=info.duration_s, actual=sampling.start_s)
    end = min(info.duration_s, sampling.end_s) if sampling.end_s is not None else info.duration_s
    span = max(0.0, end - sampling.start_s) if info.duration_s else info.frames / info.fps
    # Frames in [start, end): at most this many (as many as whole numbers in a span that long).
    in_range = max(1, math.ceil(round(span * info.fps, 3)))
    sampled = picks(in_range, step)
    expected = min(cap, sampled)
    if sampled > cap and not sampling.bounded:
        raise MediaTooLargeError(f"video has more than {cap} frames after sampling; ask for fewer (max_frames, "
                                 f"fps, start/end) or raise the limit", limit=cap, actual=sampled)
    # The model sees one 16-frame tile at a time: that, not the clip, bounds its tokens.
    check_limit("video tokens per tile", TILE // TUBELET * plan.tokens, limits.max_tokens,
                error=MediaOutOfRangeError)
    # Decoding reads from the keyframe before `start` through the range (or, once as many frames
    # as asked are kept, to the last of them), and one more that shows it is over.
    lead = math.ceil(round(decoding_lead(data, sampling.start_s) * info.fps, 3))
    stops_early = expected == cap and sampling.bounded
    through = min(in_range, math.ceil(round((expected - 1) * step, 3)) + 1) if stops_early else in_range
    decoded = lead + through + 1
    work = decoding_work(info.width * info.height, expected, decoded - expected)
    if work > limits.max_video_pixels:
        raise MediaTooLargeError(
            f"decoding this video converts {expected} frames of {info.width}x{info.height} and decodes "
            f"{decoded - expected} more to drop them: {work} pixels of work (a dropped frame counts 1/{DROPPED_SHARE}, "
            f"any frame at least {FRAME_FLOOR}), "
            f"over the limit of {limits.max_video_pixels} (max_video_pixels); ask for fewer frames (fps, max_frames, "
            f"end), send it as a job (POST /jobs/{{op}}: no request deadline), or raise the limit",
            limit=limits.max_video_pixels, actual=work)
    return VideoPlan(info, plan, sampling, step, info.fps / step, cap, expected, limits.max_video_pixels, work)


def picks(frames: int, step: float) -> int:
    """How many of `frames` consecutive frames sampling keeps: the first, then one at or after
    every `step` frames from it (`iter_frames`)."""
    return math.floor(round((frames - 1) / step, 6)) + 1


def decoding_work(frame_pixels: int, kept: int, dropped: int) -> int:
    """What decoding a video costs, in source pixels: every kept frame's, an eighth of every
    dropped one's (decoded, not converted or resized), each at least FRAME_FLOOR."""
    return (max(frame_pixels, FRAME_FLOOR) * kept
            + max(frame_pixels // DROPPED_SHARE, FRAME_FLOOR) * dropped)


def iter_frames(data: Source, plan: VideoPlan) -> Iterator[np.ndarray]:
    """The sampled frames, uint8 [h, w, 3] at the model size, one at a time. A decoding error,
    or a stream that ends well before what its container declares, raises CorruptMediaError
    naming the frame and time where it happened: a damaged file is never half-returned."""
    sampling, info = plan.sampling, plan.info
    kept, index, t, next_pick = 0, -1, 0.0, 0.0

    def within_plan() -> None:
        # Held while decoding: a stream whose header or time stamps lie decodes no more than
        # its plan allowed (time stamps alone would let one thread decode on and on).
        if decoding_work(info.width * info.height, kept, index + 1 - kept) > plan.max_work:
            raise MediaTooLargeError(f"video holds more frames than its header declares: decoding passed the "
                                     f"limit of {plan.max_work} pixels of work after {index + 1} frames decoded",
                                     limit=plan.max_work, actual=index + 1)

    try:
        for frame in _frames_from(data, sampling.start_s):
            index += 1
            within_plan()  # this frame counted as dropped
            t = float(frame.pts * frame.time_base) if frame.pts is not None else index / info.fps
            if t < sampling.start_s - 1e-6:
                continue
            if sampling.end_s is not None and t >= sampling.end_s - 1e-6:  # [start, end), as ffmpeg's -to
                return
            past = t > info.duration_s + 1.0
            if (past or kept >= plan.cap) and sampling.bounded:
                return  # as many frames as asked, or the asked range is over
            if not past and index < next_pick - 1e-6:
                continue  # between picks (after the last one the limit allows, the stream may just end)
            if past or kept >= plan.cap:
                raise MediaTooLargeError(f"video runs past what its header declares ({kept} frames, "
                                         f"{t:.2f} s); ask for fewer (max_frames, start/end)",
                                         limit=plan.cap, actual=kept + 1)
            # Picks fall every `step` frames from the first (25 fps at 10: 2.5 frames apart, so 2
            # frames in 5), not every ceil(step) from the last pick (3 apart: 8.3 fps labelled 10).
            next_pick = (next_pick if kept else index) + plan.step
            kept += 1
            within_plan()  # and as kept
            yield resize_rgb(frame.to_ndarray(format="rgb24"), plan.resize.model)
    except av.error.FFmpegError as exc:
        # Frames are counted from the keyframe decoding began at: from the file's start only
        # without `start`.
        where = f"after frame {index + 1} (at {t:.2f} s)" if not sampling.start_s else f"at {t:.2f} s"
        raise CorruptMediaError(f"video decoding failed {where}: {exc}") from None
    if kept == 0:
        raise CorruptMediaError("no frames decoded in the requested range")
    # Declared durations are approximate; a stream a tenth short (and a second) is damaged.
    if not sampling.bounded and kept < plan.expected * 0.9 - plan.fps:
        raise CorruptMediaError(f"video stream ends at frame {index + 1} (t = {t:.2f} s), but its container "
                                f"declares {info.duration_s:.2f} s: the file is truncated or damaged")


def _frames_from(data: Source, start_s: float) -> Iterator[av.VideoFrame]:
    """The video stream's frames in order, from the last keyframe at or before `start_s` (the
    demuxer seeks there rather than decoding everything before it, as ffmpeg's input `-ss`).
    Frames from `start_s` on decode the same either way: decoding restarts at a keyframe, and
    pictures that lean on frames before it are shown before it. Where the container cannot seek
    exactly (the first frame comes after `start_s`, or has no time stamp), from the file's start."""
    if start_s > 0:
        with _open(data) as container:
            found = _seek(container, start_s)
            if found is not None:
                yield found[0]
                yield from found[1]
                return
    with _open(data) as container:
        yield from container.decode(_stream(container))


def decoding_lead(data: Source, start_s: float) -> float:
    """Seconds of video decoded only to reach `start_s`: from the keyframe decoding begins at
    (`_frames_from`, which makes the same choice), or from the file's start. Keyframes can be
    far apart (screen recordings: 10 s and more), and a container that cannot seek exactly
    decodes everything before `start_s`; a plan must count those frames before decoding."""
    if start_s <= 0:
        return 0.0
    with _open(data) as container:
        found = _seek(container, start_s)
    return start_s if found is None else max(0.0, start_s - float(found[0].pts * found[0].time_base))


def _seek(container: av.container.InputContainer, start_s: float) -> tuple[av.VideoFrame, Iterator] | None:
    """The first frame from the keyframe at or before `start_s`, and the frames after it; None
    where the container cannot seek exactly there."""
    stream = _stream(container)
    if not stream.time_base:
        return None
    try:
        container.seek(int(start_s / stream.time_base), stream=stream, backward=True)
        frames = container.decode(stream)
        first = next(frames, None)
    except av.error.FFmpegError:  # decoded again from the start: a real error shows there
        return None
    if first is None or first.pts is None or first.pts * first.time_base > start_s + 1e-6:
        return None
    return first, frames


def _stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return stream


def iter_tiles(frames: Iterable[np.ndarray], size: int = TILE) -> Iterator[np.ndarray]:
    """Frames -> uint8 [<= size, h, w, 3] tiles, the official encoder's temporal unit."""
    tile: list[np.ndarray] = []
    for frame in frames:
        tile.append(frame)
        if len(tile) == size:
            yield np.stack(tile)
            tile = []
    if tile:
        yield np.stack(tile)


def pad_to_tubelets(frames: np.ndarray) -> np.ndarray:
    """Repeat the last frame up to a multiple of 4 (the official rule drops a partial tubelet;
    we keep every frame and trim the output back)."""
    pad = (-frames.shape[0]) % TUBELET
    return np.concatenate([frames, np.repeat(frames[-1:], pad, 0)]) if pad else frames


def decode_video(data: bytes, limits: MediaLimits = MediaLimits(), sampling: Sampling = Sampling()) -> DecodedVideo:
    """Every sampled frame in one array (short clips; long ones go through `iter_frames`)."""
    plan = plan_video(data, limits, sampling)
    frames = np.stack(list(iter_frames(data, plan)))
    return DecodedVideo(frames, plan.fps, plan.info, plan.resize)


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


AUDIO_CODECS = {"mp4": {"aac", "mp3", "alac", "ac3", "eac3", "opus"}, "webm": {"opus", "vorbis"}}


class VideoWriter:
    """Frames -> an MP4 (H.264, fast start) or WebM (VP9) file, written one frame at a time, with
    the source's first audio stream copied packet by packet (no re-encoding), trimmed to the
    span the frames cover. Memory stays at one frame and the encoder's look-ahead."""

    def __init__(self, path: str, fps: float, fmt: str = "mp4", audio_source: Source | None = None,
                 start_s: float = 0.0, crf: int = 18):
        fmt = fmt.lower()
        if fmt not in ("mp4", "webm"):
            raise UnsupportedMediaError(f"video output format {fmt!r} unsupported; choose mp4 or webm")
        self.fps, self.fmt, self.start_s, self.frames = fps, fmt, start_s, 0
        options = {"movflags": "faststart"} if fmt == "mp4" else {}
        self.container = av.open(path, mode="w", format=fmt, options=options)
        codec = "libx264" if fmt == "mp4" else "libvpx-vp9"
        self.stream = self.container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = {"crf": str(crf), "preset": "veryfast"} if fmt == "mp4" else {"crf": "32", "b:v": "0"}
        self.sized = False
        # write() runs in a worker thread; abort() may come from another while it runs (a
        # cancelled request): PyAV containers must never be used by two threads at once.
        self._lock = threading.Lock()
        self._closed = False
        self.audio_note = "none"
        self._audio_in = self._audio_out = self._packets = None
        self._pending = None
        if audio_source is not None:
            self._open_audio(audio_source)

    def _open_audio(self, data: Source) -> None:
        source = _open(data)
        if not source.streams.audio:
            source.close()
            return
        stream = source.streams.audio[0]
        if stream.codec_context.name not in AUDIO_CODECS[self.fmt]:
            self.audio_note = f"dropped ({stream.codec_context.name} does not fit {self.fmt})"
            source.close()
            return
        self._audio_in, self._audio_src = stream, source
        self._audio_out = self.container.add_stream_from_template(stream)
        self._packets = source.demux(stream)
        self.audio_note = "copied"

    def write(self, frame: np.ndarray) -> None:
        """uint8 [H, W, 3]; odd sides are padded by one edge pixel (yuv420p needs even sizes)."""
        with self._lock:
            if not self._closed:
                self._write(frame)

    def _write(self, frame: np.ndarray) -> None:
        h, w, _ = frame.shape
        eh, ew = _even(h), _even(w)
        if not self.sized:
            self.stream.width, self.stream.height, self.sized = ew, eh, True
        if (eh, ew) != (h, w):
            frame = np.pad(frame, ((0, eh - h), (0, ew - w), (0, 0)), mode="edge")
        for packet in self.stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
            self.container.mux(packet)
        self.frames += 1
        self._mux_audio(until_s=self.frames / self.fps)

    def _mux_audio(self, until_s: float) -> None:
        """Copy source audio packets up to `until_s` of output time, rebased by `start_s`."""
        if self._packets is None:
            return
        tb = self._audio_in.time_base
        offset = int(round(self.start_s / tb)) if tb else 0
        while True:
            packet = self._pending or next(self._packets, None)
            self._pending = None
            if packet is None or packet.pts is None:
                if packet is None:
                    self._packets = None
                    return
                continue
            at = float(packet.pts * tb) - self.start_s
            if at < -1e-6:
                continue
            if at > until_s:
                self._pending = packet  # keep it for the next frame
                return
            packet.pts -= offset
            if packet.dts is not None:
                packet.dts -= offset
            packet.stream = self._audio_out
            self.container.mux(packet)

    def close(self) -> None:
        with self._lock:
            for packet in self.stream.encode():
                self.container.mux(packet)
            self._mux_audio(until_s=self.frames / self.fps)
            self._release()

    def abort(self) -> None:
        """Stop, waiting for a write in progress; the file is discarded by the caller."""
        with self._lock:
            if not self._closed:
                try:
                    self._release()
                except Exception:  # noqa: BLE001 - the file is discarded anyway
                    pass

    def _release(self) -> None:
        self._closed = True
        self.container.close()
        if self._audio_in is not None:
            self._audio_src.close()
