"""Cost before work, as functions: token sets, media and JSON are bounded before use."""

import json
from dataclasses import replace

import numpy as np
import pytest

from service.budget import check_media, check_token_set, json_depth, parse_json
from service.errors import BadRequest, InvalidParameter, PayloadTooLarge
from service.media.image import plan_resize
from service.media.errors import MediaOutOfRangeError, MediaTooLargeError
from service.media.limits import MediaLimits

LIMITS = MediaLimits(max_side=512, max_frames=64, max_pixels=4096 * 4096, max_tokens=16384, max_voxels=16384)


def grid(t, h, w):
    return np.array([(a, b, c, 0) for a in range(t) for b in range(h) for c in range(w)], np.int32)


def test_full_grids_are_token_sets():
    assert check_token_set(grid(1, 3, 5), "image", LIMITS, "x") == (1, 3, 5)
    assert check_token_set(grid(16, 2, 2), "video", LIMITS, "x") == (16, 2, 2)
    assert check_token_set(np.array([[1, 0, 0, 0], [1, 63, 63, 63]]), "3D", LIMITS, "x") == (1, 64, 64)


@pytest.mark.parametrize("coords,kind", [
    (np.array([[0, 3000, 3000, 0]]), "image"),  # the 17 GB canvas of one token
    (np.array([[0, 32, 0, 0]]), "image"),  # one past max_side / 16
    (grid(2, 1, 1), "image"),  # images have one latent frame
    (grid(17, 1, 1), "video"),  # more than max_frames / 4
    (grid(1, 3, 3)[:-1], "image"),  # a hole
    (np.concatenate([grid(1, 2, 2), grid(1, 1, 1)]), "image"),  # a duplicate
    (np.array([[0, 0, 0, 1]]), "image"),  # z must be 0
    (np.array([[0, -1, 0, 0]]), "image"),
    (np.array([[0, 1, 1, 1]]), "3D"),  # 3D tokens sit at t = 1
    (np.array([[1, 64, 0, 0]]), "3D"),
])
def test_token_sets_that_cannot_be_decoded_are_refused(coords, kind):
    with pytest.raises(InvalidParameter):
        check_token_set(coords, kind, LIMITS, "items[0]")


def test_too_many_tokens_is_413():
    with pytest.raises(PayloadTooLarge) as err:
        check_token_set(np.zeros((16385, 4), np.int32), "image", LIMITS, "x")
    assert err.value.limit == 16384


def test_a_video_counts_its_tokens_per_tile_it_is_decoded_in():
    """/decode streams a video tile by tile (4 latent frames): its length is bounded by
    max_frames, the tokens the decoder holds at once by max_tokens."""
    long = MediaLimits(max_side=512, max_frames=4096, max_tokens=4 * 32 * 32)
    assert check_token_set(grid(40, 32, 32), "video", long, "x") == (40, 32, 32)  # 40,960 tokens in all
    with pytest.raises(PayloadTooLarge) as err:
        check_token_set(grid(5, 32, 33), "video", MediaLimits(max_side=1024, max_frames=4096,
                                                              max_tokens=4 * 32 * 32), "x")
    assert err.value.limit == 4 * 32 * 32 and "in a tile of 4 latent frames" in str(err.value)


def test_media_is_typed_and_bounded_by_the_pixel_limit():
    assert check_media(None, "image", (1, 2, 3), LIMITS, "x") == {
        "model_height": 32, "model_width": 48, "height": 32, "width": 48, "frames": 1}
    out = check_media({"height": 720, "width": 1280, "fps": 30, "frames": 7}, "video", (2, 2, 2), LIMITS, "x")
    assert (out["height"], out["width"], out["frames"], out["fps"]) == (720, 1280, 7, 30.0)
    for bad in ({"height": 20000, "width": 20000}, {"height": "abc"}, {"height": 0}, {"height": -5},
                {"width": True}, {"model_height": 64}, {"fps": float("nan")}, {"fps": 0}, {"frames": 9}):
        kind = "video" if {"fps", "frames"} & set(bad) else "image"
        with pytest.raises(InvalidParameter):
            check_media(bad, kind, (2, 2, 2) if kind == "video" else (1, 2, 2), LIMITS, "x")


def test_a_videos_output_canvas_is_bounded_before_any_frame_is_made():
    """A token a frame cannot ask for 4096x4096 frames by the thousand: frames x pixels is
    bounded by max_video_pixels (64 x 512^2 here), at 413."""
    limits = replace(LIMITS, max_video_pixels=64 * 512**2)
    ok = {"height": 512, "width": 512, "frames": 64}
    assert check_media(ok, "video", (16, 1, 1), limits, "x")["frames"] == 64
    with pytest.raises(PayloadTooLarge) as err:
        check_media({"height": 4096, "width": 4096, "frames": 2}, "video", (16, 1, 1), limits, "x")
    assert err.value.limit == 64 * 512**2


def test_json_size_and_depth():
    assert parse_json(b'{"a": [1, {"b": 2}]}', 100, 3) == {"a": [1, {"b": 2}]}
    assert json_depth({"a": [1, {"b": [[]]}]}) == 5
    with pytest.raises(BadRequest):
        parse_json(b"[" * 100_000 + b"]" * 100_000, 10**6, 32)
    with pytest.raises(BadRequest):
        parse_json(json.dumps([[[[1]]]]).encode(), 100, 3)
    with pytest.raises(PayloadTooLarge):
        parse_json(b"[" + b"1," * 100 + b"1]", 100, 3)


def test_thin_and_tiny_images_are_never_upscaled_into_many_tokens():
    assert plan_resize(8, 8, LIMITS).model == (16, 16)  # tiny: up to one patch
    assert plan_resize(10, 300, LIMITS).model == (16, 480)  # thin: the short side padded to a patch
    assert plan_resize(3000, 4000, LIMITS).model == (384, 512)
    with pytest.raises(MediaOutOfRangeError) as err:
        plan_resize(1, 60000, LIMITS)
    assert err.value.limit == 32
    with pytest.raises(MediaOutOfRangeError):
        plan_resize(4096, 4096, MediaLimits(max_side=4096, max_tokens=16384))
    assert isinstance(MediaOutOfRangeError("x"), Exception) and not issubclass(MediaOutOfRangeError, MediaTooLargeError)
