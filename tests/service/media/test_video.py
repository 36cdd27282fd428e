import time

import av
import numpy as np
import pytest
from io import BytesIO

from service.media.errors import CorruptMediaError, MediaOutOfRangeError, MediaTooLargeError, UnsupportedMediaError
from service.media.limits import MediaLimits
from dataclasses import replace

from service.media import video
from service.media.image import resize_rgb
from service.media.video import Sampling, decode_video, encode_video, iter_frames, plan_video, probe_video
from tests import assets


def test_probe_real_clip():
    info = probe_video(assets.video("bikes.mp4").read_bytes())
    assert (info.width, info.height, info.fps, info.frames, info.codec) == (640, 272, 25.0, 250, "h264")
    assert info.duration_s == pytest.approx(10.0)


def test_decode_with_sampling():
    data = assets.video("bikes.mp4").read_bytes()
    out = decode_video(data, MediaLimits(max_side=256), Sampling(fps=5, max_frames=8, start_s=1.0))
    assert out.frames.shape == (8, 112, 256, 3) and out.fps == 5.0
    clip = decode_video(data, MediaLimits(max_side=128), Sampling(start_s=2.0, end_s=2.5))
    assert 12 <= clip.frames.shape[0] <= 14


def test_long_video_without_sampling_names_the_frame_limit():
    with pytest.raises(MediaTooLargeError) as err:
        decode_video(assets.video("bikes.mp4").read_bytes(), MediaLimits(max_frames=16, max_side=64))
    assert err.value.limit == 16


def test_limits_checked_before_decoding():
    data = assets.video("bikes.mp4").read_bytes()
    start = time.perf_counter()
    with pytest.raises(MediaTooLargeError, match="duration"):
        decode_video(data, MediaLimits(max_duration_s=5))
    with pytest.raises(MediaTooLargeError, match="frame size"):
        decode_video(data, MediaLimits(max_pixels=320 * 240))
    assert time.perf_counter() - start < 1.0


BIKES_FRAME = 640 * 272  # pixels of each of bikes.mp4's 250 frames (10 s at 25 fps)


def test_decoding_work_is_bounded_from_the_header():
    """Decoding is paid per source pixel: every kept frame whole, every frame decoded only to be
    dropped (before start, between fps samples) an eighth. Over the limit is refused before a
    frame is decoded; sampling that keeps fewer frames brings the same clip within it."""
    data = assets.video("bikes.mp4").read_bytes()
    limit = 100 * BIKES_FRAME
    start = time.perf_counter()
    with pytest.raises(MediaTooLargeError, match="max_video_pixels") as err:
        plan_video(data, MediaLimits(max_side=64, max_video_pixels=limit))
    assert time.perf_counter() - start < 1.0
    assert err.value.limit == limit and err.value.actual >= 250 * BIKES_FRAME
    # 5 fps keeps 50 frames and drops 200 (+1 read past the end): 75 frames' worth.
    plan = plan_video(data, MediaLimits(max_side=64, max_video_pixels=limit), Sampling(fps=5))
    assert plan.expected == 50 and plan.max_work == limit
    assert sum(1 for _ in iter_frames(data, plan)) == 50
    # Frames between the keyframe before `start` and `start` are decoded and dropped too: 8 s in,
    # 2 s kept (50 frames) and the 13 from the keyframe at 7.48 s (+1 read past the end).
    with pytest.raises(MediaTooLargeError, match="1/8"):
        plan_video(data, MediaLimits(max_side=64, max_video_pixels=51 * BIKES_FRAME), Sampling(start_s=8.0))
    assert plan_video(data, MediaLimits(max_side=64, max_video_pixels=52 * BIKES_FRAME), Sampling(start_s=8.0))


def test_tiny_frames_cost_at_least_the_decoders_own_work_each():
    """Thousands of 16x16 frames (13 bytes each in H.264) are cheap in pixels but not in time
    (38 us each here): every frame counts at least FRAME_FLOOR pixels."""
    buf = BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=1000)
        s.width = s.height = 16
        s.options = {"preset": "ultrafast"}
        frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
        for _ in range(3000):
            c.mux(s.encode(frame))
        c.mux(s.encode())
    data = buf.getvalue()
    # At 10 fps: 30 kept and 2,970 dropped (3 s at 1000 fps) -> 3,000 x 4,096 = 12.3 million;
    # by pixels alone (30 x 256 + 2,970 x 32) it would be 0.1 million.
    with pytest.raises(MediaTooLargeError, match="at least 4096") as err:
        plan_video(data, MediaLimits(max_side=64, max_video_pixels=10**6), Sampling(fps=10))
    assert err.value.actual >= 3000 * video.FRAME_FLOOR
    plan = plan_video(data, MediaLimits(max_side=64, max_video_pixels=13 * 10**6), Sampling(fps=10))
    assert sum(1 for _ in iter_frames(data, plan)) == 30


def test_decoding_stops_at_the_limit_whatever_the_stream_holds():
    """The plan's limit holds while decoding, not only against the header: a stream holding more
    than it declares (here: a plan allowing 40 frames' work) stops there, with 413's error."""
    data = assets.video("bikes.mp4").read_bytes()
    plan = replace(plan_video(data, MediaLimits(max_side=64)), max_work=40 * BIKES_FRAME)
    frames = []
    with pytest.raises(MediaTooLargeError, match="more frames than its header declares") as err:
        for frame in iter_frames(data, plan):
            frames.append(frame)
    assert len(frames) == 40 and err.value.limit == 40 * BIKES_FRAME
    # Dropped frames count an eighth: at 5 fps, 27 kept and the 104 dropped between them are
    # exactly 40 frames' work, and the next dropped frame passes it.
    plan = replace(plan_video(data, MediaLimits(max_side=64), Sampling(fps=5)), max_work=40 * BIKES_FRAME)
    frames = []
    with pytest.raises(MediaTooLargeError):
        for frame in iter_frames(data, plan):
            frames.append(frame)
    assert len(frames) == 27


def _from_the_start(data: bytes, start_s: float, count: int, size: tuple[int, int]) -> np.ndarray:
    """The first `count` frames at or after start_s, decoding every frame from the file's start."""
    out = []
    with av.open(BytesIO(data)) as c:
        for frame in c.decode(c.streams.video[0]):
            if frame.pts * frame.time_base >= start_s - 1e-6 and len(out) < count:
                out.append(resize_rgb(frame.to_ndarray(format="rgb24"), size))
    return np.stack(out)


@pytest.mark.parametrize("name, starts", [("bikes.mp4", (1.0, 3.04, 5.5, 9.7)),  # keyframes 0, 1.2, 3.04, 5.48, ...
                                          ("carphone_pristine.mp4", (2.0,))])
def test_start_seeks_to_the_keyframe_before_and_gives_the_same_frames(name, starts):
    data = assets.video(name).read_bytes()
    for start in starts:
        clip = decode_video(data, MediaLimits(max_side=128), Sampling(start_s=start, max_frames=12))
        assert np.array_equal(clip.frames, _from_the_start(data, start, 12, clip.resize.model)), start


def test_frames_before_the_keyframe_before_start_are_not_decoded():
    """9.7 s into bikes (a keyframe at 9.68 s), 6 frames' work is enough for 4 kept frames;
    decoding the 242 frames before them would count 30 frames' work more."""
    data = assets.video("bikes.mp4").read_bytes()
    plan = plan_video(data, MediaLimits(max_side=64), Sampling(start_s=9.7, max_frames=4))
    assert len(list(iter_frames(data, replace(plan, max_work=6 * BIKES_FRAME)))) == 4


def _sparse_keyframes(seconds: int = 16, fps: int = 25, side: int = 64) -> bytes:
    """H.264 with one keyframe every 12 s, as screen recordings have."""
    buf = BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width = s.height = side
        s.options = {"preset": "ultrafast", "g": str(12 * fps), "keyint_min": str(12 * fps), "sc_threshold": "0"}
        for i in range(seconds * fps):
            frame = np.full((side, side, 3), (i * 7) % 256, np.uint8)
            c.mux(s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        c.mux(s.encode())
    return buf.getvalue()


@pytest.mark.parametrize("fps, frames", [(10, 400), (7, 280), (12.5, 500), (25, 1000), (None, 1000)])
def test_sampling_keeps_the_asked_rate(fps, frames):
    """Picks fall every `step` source frames from the first: 25 fps at 10 keeps 2 frames in 5.
    Picking ceil(step) after the last pick kept 1 in 3 (8.3 fps, labelled 10), and a clip of
    40 s was then refused as truncated for falling short of its plan."""
    data = _sparse_keyframes(seconds=40, side=16)
    plan = plan_video(data, MediaLimits(max_side=64, max_frames=2000), Sampling(fps=fps))
    assert plan.expected == frames and plan.fps == (fps or 25)
    assert sum(1 for _ in iter_frames(data, plan)) == frames


def test_a_video_with_exactly_the_frame_limit_after_sampling_is_served():
    """At 5 fps bikes keeps 50 frames; with a limit of 50 the frames dropped after the last
    pick are not one too many (they were refused as running past the header)."""
    data = assets.video("bikes.mp4").read_bytes()
    plan = plan_video(data, MediaLimits(max_side=64, max_frames=50), Sampling(fps=5))
    assert sum(1 for _ in iter_frames(data, replace(plan, max_work=plan.work))) == 50
    with pytest.raises(MediaTooLargeError, match="more than 49 frames"):
        plan_video(data, MediaLimits(max_side=64, max_frames=49), Sampling(fps=5))


def test_end_is_not_included_as_with_ffmpegs_to():
    data = assets.video("bikes.mp4").read_bytes()
    assert decode_video(data, MediaLimits(max_side=64), Sampling(end_s=9.0)).frames.shape[0] == 225
    assert decode_video(data, MediaLimits(max_side=64), Sampling(start_s=1.0, end_s=2.0)).frames.shape[0] == 25


def test_a_start_past_the_end_is_refused_from_the_header():
    data = assets.video("carphone_pristine.mp4").read_bytes()
    with pytest.raises(MediaOutOfRangeError, match="past the video's end"):
        plan_video(data, MediaLimits(max_side=64), Sampling(start_s=60.0))


@pytest.mark.parametrize("start", [0.0, 0.013, 3.04, 8.0])
@pytest.mark.parametrize("fps, max_frames, end", [(None, None, None), (7, 10, None), (10, None, 9.0), (23.976, 40, None),
                                                  (12.5, None, 4.02)])
def test_decoding_stays_within_the_work_its_plan_counted(start, fps, max_frames, end):
    """The plan is an upper bound of what decoding reads (its frames and the one after), and of
    the frames it keeps, for any sampling: a request within the limit is never refused mid-way."""
    data = assets.video("bikes.mp4").read_bytes()
    plan = plan_video(data, MediaLimits(max_side=64), Sampling(fps, max_frames, start, end))
    kept = sum(1 for _ in iter_frames(data, replace(plan, max_work=plan.work)))
    assert plan.expected - 1 <= kept <= plan.expected


@pytest.mark.parametrize("start", [0.0, 3.0, 11.0, 12.0, 13.5])
def test_a_plan_counts_every_frame_decoding_will_read(start):
    """Keyframes 12 s apart: 11 s in, decoding reads from 0 s. The plan counts those frames
    from where the seek lands, so decoding within the plan's own work never stops mid-way."""
    data = _sparse_keyframes()
    plan = plan_video(data, MediaLimits(max_side=64), Sampling(start_s=start, max_frames=20))
    assert video.decoding_lead(data, start) == pytest.approx(start % 12, abs=0.05)
    frames = list(iter_frames(data, replace(plan, max_work=plan.work)))
    assert len(frames) == 20 == plan.expected


def test_a_seek_that_lands_late_decodes_from_the_start(monkeypatch):
    """Containers that cannot seek exactly: the first frame after the seek comes after `start`,
    so the frames are decoded from the file's start instead, never with a gap; the plan counts
    every frame before `start`."""
    class LateSeek:
        def __init__(self, container):
            self.container = container

        def seek(self, offset, **kwargs):
            return self.container.seek(offset * 3, **kwargs)  # past the asked time

        def __getattr__(self, name):
            return getattr(self.container, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.container.__exit__(*exc)

    opened = video._open
    monkeypatch.setattr(video, "_open", lambda data: LateSeek(opened(data)))
    data = assets.video("bikes.mp4").read_bytes()
    clip = decode_video(data, MediaLimits(max_side=128), Sampling(start_s=2.0, max_frames=12))
    assert np.array_equal(clip.frames, _from_the_start(data, 2.0, 12, clip.resize.model))
    # 8 s in, 2 s kept (50 frames) and the 200 before them dropped (+1): 75 frames' work.
    with pytest.raises(MediaTooLargeError, match="1/8"):
        plan_video(data, MediaLimits(max_side=64, max_video_pixels=70 * BIKES_FRAME), Sampling(start_s=8.0))
    assert plan_video(data, MediaLimits(max_side=64, max_video_pixels=76 * BIKES_FRAME), Sampling(start_s=8.0))


def test_truncated_and_corrupt_videos():
    data = assets.video("bikes.mp4").read_bytes()
    with pytest.raises(CorruptMediaError):
        decode_video(data[:2000])
    with pytest.raises((CorruptMediaError, UnsupportedMediaError)):
        decode_video(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 500)


def test_mp4_encode_plays_back_with_same_fps_and_size():
    frames = (np.random.default_rng(0).random((12, 35, 49, 3)) * 255).astype(np.uint8)
    data = encode_video(frames, fps=25, fmt="mp4")
    with av.open(BytesIO(data)) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264" and s.codec_context.pix_fmt == "yuv420p"
        assert (s.codec_context.width, s.codec_context.height) == (50, 36)
        assert float(s.average_rate) == 25.0
        assert sum(1 for _ in c.decode(s)) == 12
    # Fast start: the index (moov) precedes the media data (mdat) so browsers stream it.
    assert data.find(b"moov") < data.find(b"mdat")


def test_webm_encode():
    frames = np.zeros((4, 32, 32, 3), np.uint8)
    data = encode_video(frames, fps=10, fmt="webm")
    assert data[:4] == b"\x1aE\xdf\xa3"


def test_round_trip_quality_on_real_clip():
    clip = decode_video(assets.video("carphone_pristine.mp4").read_bytes(), MediaLimits(max_side=176),
                        Sampling(max_frames=8))
    data = encode_video(clip.frames, clip.fps)
    again = decode_video(data, MediaLimits(max_side=176))
    mse = np.mean((again.frames.astype(float) - clip.frames.astype(float)) ** 2)
    assert 10 * np.log10(255**2 / mse) > 30  # yuv420p halves chroma resolution
