"""Streamed /tokenize answers in JSON: the list format across chunk boundaries parses to the
spooled arrays, and a non-finite value is a typed error, not invalid JSON."""

import json

import numpy as np
import pytest

from service import token_files as tf
from service.errors import NonFiniteOutput


def _streamed(latents: np.ndarray) -> tf.StreamedTokens:
    item = tf.StreamedTokens(tf.Spool(np.dtype(np.int32), 4), tf.Spool(np.dtype(np.float32), latents.shape[1]),
                             "latents", {"index": 0, "modality": "video", "num_tokens": len(latents)})
    coords = np.arange(4 * len(latents), dtype=np.int32).reshape(-1, 4)
    for lo in range(0, len(latents), 1000):  # appended tile by tile
        item.coords.append(coords[lo:lo + 1000])
        item.values.append(latents[lo:lo + 1000])
    return item


@pytest.mark.parametrize("fmt", ["list", "base64"])
def test_streamed_json_parses_to_the_spooled_arrays(tmp_path, fmt):
    rows = tf.CHUNK_ROWS + 123  # two chunks
    latents = np.random.default_rng(0).standard_normal((rows, 8)).astype(np.float32)
    item = _streamed(latents)
    path = tmp_path / "answer.json"
    tf.write_json(str(path), {"model": {"variant": "tiny"}, "mode": "continuous"},
                  [{"index": 1, "num_tokens": 0}, item], fmt)
    body = json.loads(path.read_text())
    got = body["items"][1]["latents"]
    assert got["shape"] == [rows, 8] and body["items"][0] == {"index": 1, "num_tokens": 0}
    if fmt == "list":
        assert np.array_equal(np.asarray(got["data"], np.float32), latents)
        assert np.array_equal(np.asarray(body["items"][1]["coords"]["data"]), np.arange(4 * rows).reshape(-1, 4))
    item.remove()


def test_a_non_finite_streamed_value_is_a_typed_error(tmp_path):
    latents = np.ones((tf.CHUNK_ROWS + 5, 8), np.float32)
    latents[-1, 3] = np.nan  # in the second chunk, after the first was written
    item = _streamed(latents)
    with pytest.raises(NonFiniteOutput, match="the latents"):
        tf.write_json(str(tmp_path / "answer.json"), {"mode": "continuous"}, [item], "list")
    item.remove()
