import time

import av
import numpy as np
import pytest
from io import BytesIO

from service.media.errors import CorruptMediaError, MediaTooLargeError, UnsupportedMediaError
from service.media.limits import MediaLimits
from service.media.video import Sampling, decode_video, encode_video, probe_video
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
