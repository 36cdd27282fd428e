"""Streamed work in pieces gives the numbers of the whole: a video's tokens decoded tile by
tile (what /decode does past one tile) equal the decode of the whole set."""

import numpy as np

from service.media import video as vid
from service.pipeline import model_size_frames
from service.settings import Settings
from service.streaming import TILE_FRAMES, tile_tokens, token_tiles
from service.worker.backends import LocalBackend
from service.worker.jobs import Job, pixel_patches


def test_a_video_decoded_tile_by_tile_equals_the_whole_decode():
    backend = LocalBackend(Settings(variant="tiny", dtype="float32").model_spec)
    backend.start()
    frames = np.random.default_rng(0).integers(0, 255, (40, 64, 48, 3), dtype=np.uint8)  # 3 tiles, the last short
    tokens = backend.run([Job(0, "tokenize", batch=pixel_patches(vid.pad_to_tubelets(frames)))])[0].tokens
    assert token_tiles(tokens) == 3
    whole = backend.run([Job(1, "decode", tokens=tokens, pixels=True)])[0]
    expected = model_size_frames(whole.tubelets, tokens.coords, "video", len(frames))
    pieces = []
    for k in range(3):
        tile = tile_tokens(tokens, k)
        assert tile.coords[:, 1].min() == 0 and tile.coords[:, 1].max() <= 3  # t re-based within the tile
        result = backend.run([Job(2 + k, "decode", tokens=tile, pixels=True)])[0]
        pieces.append(model_size_frames(result.tubelets, tile.coords, "video", min(TILE_FRAMES, 40 - k * TILE_FRAMES)))
    assert not np.array_equal(pieces[0][:8], pieces[1][:8])  # each tile its own frames
    streamed = np.concatenate(pieces)
    assert streamed.shape == expected.shape == (40, 64, 48, 3)
    assert np.abs(streamed.astype(int) - expected.astype(int)).max() <= 1  # float rounding across batch shapes
