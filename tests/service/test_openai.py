"""The official `openai` client against /v1: the same embeddings as /encode, in both
encodings, usage counted in tokens, and errors in the OpenAI shape."""

import base64
import io

import numpy as np
import openai
import pytest
from PIL import Image

from tests import assets
from tests.service.server import LiveServer

KEY = "openai-key"
JPG = assets.image("rocket.jpg").read_bytes()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.open(assets.image("astronaut.png")).convert("RGB").resize((96, 64)).save(buf, "PNG")
    return buf.getvalue()


PNG = _png()


@pytest.fixture(scope="module")
def live():
    with LiveServer(worker="thread", api_keys=KEY, max_side=256) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)


def _vectors(response) -> np.ndarray:
    rows = []
    for item in sorted(response.data, key=lambda d: d.index):
        e = item.embedding
        rows.append(np.frombuffer(base64.b64decode(e), "<f4") if isinstance(e, str) else np.asarray(e, np.float32))
    return np.stack(rows)


def test_models_list_the_served_model(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "tiny" and "atoken" in ids


@pytest.mark.parametrize("encoding", ["float", "base64", None])
def test_embeddings_equal_encode(live, client, encoding):
    inputs = ["data:image/jpeg;base64," + base64.b64encode(JPG).decode(), base64.b64encode(PNG).decode()]
    kwargs = {"encoding_format": encoding} if encoding else {}  # None: the client asks base64 and decodes
    response = client.embeddings.create(model="tiny", input=inputs, **kwargs)
    ours = _vectors(response)
    with live.client(headers={"x-api-key": KEY}) as c:
        files = [("file", ("a.jpg", JPG)), ("file", ("b.png", PNG))]
        reference = np.asarray([i["embedding"] for i in c.post("/encode", files=files).json()["items"]], np.float32)
        tokens = sum(i["num_tokens"] for i in c.post("/tokenize", files=files).json()["items"])
    cosine = (ours * reference).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() > 0.9999, cosine
    assert response.usage.prompt_tokens == tokens == response.usage.total_tokens
    assert response.model == "tiny"


def test_errors_come_in_the_openai_shape(live, client):
    image = base64.b64encode(PNG).decode()
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="tiny", input=image, dimensions=7)
    assert err.value.code == "bad_request" and "256 dimensions" in err.value.message
    with pytest.raises(openai.NotFoundError) as err:
        client.embeddings.create(model="text-embedding-3-small", input=image)
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="tiny", input="a photo of a cat")
    assert "text is not supported" in err.value.message
    with pytest.raises(openai.UnprocessableEntityError):  # base64 that is not a picture
        client.embeddings.create(model="tiny", input=base64.b64encode(b"\x89PNG\r\n\x1a\n broken").decode())
    with pytest.raises(openai.AuthenticationError) as err:
        openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert err.value.body["type"] == "authentication_error"
    with pytest.raises(openai.UnprocessableEntityError) as err:  # URL inputs are off on this server
        client.embeddings.create(model="tiny", input="https://example.com/cat.png")
    assert "disabled" in err.value.message
    with live.client(headers={"x-api-key": KEY}) as c:
        r = c.post("/v1/embeddings", json={"model": "tiny", "input": [image] * 17})
        assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
        r = c.post("/v1/embeddings", content=b"[" * 50_000, headers={"content-type": "application/json"})
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
