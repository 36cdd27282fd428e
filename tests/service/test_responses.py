"""JSON answers: orjson's text parses to exactly the values the standard library's did, and
a model output that JSON cannot carry is a typed 500, never a silent null."""

import json

import numpy as np
import pytest

from service.arrays import array_to_json, finite_list
from service.errors import NonFiniteOutput, error_body
from service.responses import FastJSONResponse, render_json


def test_fast_json_parses_to_the_same_numbers():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal(768).astype(np.float32)
    emb[:4] = [1e-7, -3.5e-5, 1e20, 0.0]  # exponents: spelled differently, parsed the same
    body = {"items": [{"index": 0, "dim": 768, "embedding": finite_list(emb, "the embedding")}],
            "note": "ünïcode"}
    assert json.loads(render_json(body)) == json.loads(json.dumps(body))
    back = np.asarray(json.loads(FastJSONResponse(body).body)["items"][0]["embedding"], np.float32)
    assert np.array_equal(back, emb)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_model_output_is_a_typed_error(bad):
    arr = np.ones((3, 4), np.float32)
    arr[1, 2] = bad
    with pytest.raises(NonFiniteOutput, match="the latents"):
        array_to_json(arr, "list", "the latents")
    status, body, _ = error_body(NonFiniteOutput("the model produced NaN or infinite values in the latents"))
    assert status == 500 and body["error"]["code"] == "non_finite_output"
    assert array_to_json(arr, "base64")["data"]  # binary carries it as it is
    assert finite_list(np.arange(3, dtype=np.int32), "ints") == [0, 1, 2]
