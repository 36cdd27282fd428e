"""Real HTTP against the real app, worker process and model."""

import concurrent.futures as cf
import io
import json
import zipfile

import av
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load as st_load

from service.media.image import decode_image
from tests import assets

PNG = assets.image("chelsea.png")  # 300x451
JPG = assets.image("rocket.jpg")
MP4 = assets.video("carphone_pristine.mp4")


def _files(*paths):
    return [("file", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]


def test_health_ready_info(client):
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/readyz").status_code == 200
    info = client.get("/info").json()
    assert info["model"]["variant"] and info["limits"]["max_files"] == 16
    assert "torch" in info["versions"]
    if not info["model"]["trained"]:
        assert "untrained" in info["model"]["warning"]


def test_encode_multipart_and_raw(client):
    r = client.post("/encode", files=_files(PNG, JPG))
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert [i["modality"] for i in items] == ["image", "image"]
    emb = np.array([i["embedding"] for i in items])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, rtol=1e-5)
    raw = client.post("/encode", content=PNG.read_bytes(), headers={"content-type": "image/png"})
    np.testing.assert_allclose(raw.json()["items"][0]["embedding"], items[0]["embedding"], rtol=1e-4, atol=1e-5)
    assert float(r.headers["X-Queue-Time-Ms"]) >= 0 and float(r.headers["X-Compute-Time-Ms"]) > 0


def test_encode_binary_outputs(client):
    r = client.post("/encode", files=_files(PNG), headers={"accept": "application/x-npy"})
    arr = np.load(io.BytesIO(r.content))
    assert arr.shape[0] == 1 and arr.dtype == np.float32
    r = client.post("/encode?dense=true", files=_files(PNG), headers={"accept": "application/vnd.safetensors"})
    tensors = st_load(r.content)
    assert tensors["embeddings"].shape == arr.shape and tensors["item0.features"].ndim == 2


def test_tokenize_then_decode_json_and_binary(client):
    tok = client.post("/tokenize", files=_files(PNG))
    assert tok.status_code == 200, tok.text
    doc = tok.json()
    item = doc["items"][0]
    assert doc["mode"] == "continuous" and item["kind"] == "image"
    assert item["coords"]["shape"][1] == 4 and item["latents"]["shape"][0] == item["num_tokens"]
    dec = client.post("/decode", json=doc)
    assert dec.status_code == 200, dec.text
    assert dec.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(dec.content)).size == (451, 300)
    rec = client.post("/reconstruct", files=_files(PNG))
    assert dec.content == rec.content  # decode(tokenize(x)) == reconstruct(x)
    binary = client.post("/tokenize", files=_files(PNG), headers={"accept": "application/vnd.safetensors"})
    dec2 = client.post("/decode", content=binary.content, headers={"content-type": "application/vnd.safetensors"})
    assert dec2.status_code == 200 and dec2.content == dec.content
    listed = client.post("/tokenize?array_format=list", files=_files(PNG)).json()
    assert isinstance(listed["items"][0]["coords"]["data"], list)
    assert client.post("/decode", json=listed).content == dec.content


def test_discrete_tokens_need_a_quantizer(client, server):
    r = client.post("/tokenize?tokens=discrete", files=_files(PNG))
    if server.runtime.model_info.get("discrete"):
        assert r.status_code == 200 and r.json()["items"][0]["indices"]["dtype"] == "uint16"
    else:
        assert r.status_code == 422 and "quantizer" in r.json()["error"]["message"]


def test_reconstruct_image_formats_and_psnr(client):
    r = client.post("/reconstruct?format=jpeg", files=_files(JPG))
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert decode_image(r.content).shape == (427, 640, 3)
    assert float(r.headers["X-Round-Trip-PSNR"]) > 0
    frames, rows, cols = map(int, r.headers["X-Token-Grid"].split("x"))
    assert frames == 1 and rows * cols == int(r.headers["X-Tokens"]) and cols > rows  # landscape
    two = client.post("/reconstruct", files=_files(PNG, JPG))
    names = zipfile.ZipFile(io.BytesIO(two.content)).namelist()
    assert names == ["item0.png", "item1.png"]
    assert len(two.headers["X-Tokens"].split(",")) == len(two.headers["X-Token-Grid"].split(",")) == 2


def test_reconstruct_video_keeps_fps_and_frames(client):
    r = client.post("/reconstruct?max_frames=6", files=_files(MP4))
    assert r.status_code == 200, r.text
    with av.open(io.BytesIO(r.content)) as c:
        s = c.streams.video[0]
        assert abs(float(s.average_rate) - 30000 / 1001) < 0.01
        assert (s.codec_context.width, s.codec_context.height) == (176, 144)
        assert sum(1 for _ in c.decode(s)) == 6
    assert r.headers["X-Token-Grid"] == "2x9x11"  # 6 frames pad to two 4-frame tubelets; 144x176 / 16


def test_3d_volume_round_trip(client):
    rng = np.random.default_rng(0)
    coords = np.unique(rng.integers(20, 40, (60, 3)), axis=0)
    buf = io.BytesIO()
    np.savez(buf, coords=coords, feats=rng.integers(0, 255, (len(coords), 768)).astype(np.uint8))
    r = client.post("/reconstruct", content=buf.getvalue(), headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    body = r.content
    assert body.startswith(b"ply") and b"property float f_dc_0" in body
    assert r.headers["X-Tokens"] == str(len(coords))
    assert [int(v) for v in r.headers["X-Token-Grid"].split("x")] == (coords.max(0) + 1).tolist()


@pytest.mark.parametrize("data,status,code", [
    (b"", 400, "bad_request"),
    (b"definitely not media", 415, "unsupported_media_type"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, 422, "invalid_media"),
])
def test_bad_uploads(client, data, status, code):
    r = client.post("/encode", content=data, headers={"content-type": "application/octet-stream"})
    assert r.status_code == status and r.json()["error"]["code"] == code


def test_bomb_and_limits(client):
    big = Image.new("L", (20000, 20000))
    buf = io.BytesIO()
    big.save(buf, "PNG")
    r = client.post("/encode", files=[("file", ("bomb.png", buf.getvalue(), "image/png"))])
    assert r.status_code == 413 and r.json()["error"]["limit"] == 4096 * 4096
    r = client.post("/encode", files=_files(*([PNG] * 17)))
    assert r.status_code == 413 and r.json()["error"]["limit"] == 16


def test_bad_parameters_and_tokens(client):
    assert client.post("/tokenize?tokens=banana", files=_files(PNG)).status_code == 422
    assert client.post("/reconstruct?format=mp4", files=_files(PNG)).status_code == 422
    assert client.post("/decode", content=b"{", headers={"content-type": "application/json"}).status_code == 400
    doc = client.post("/tokenize", files=_files(PNG)).json()
    doc["items"][0]["latents"]["shape"] = [3, 3]
    assert client.post("/decode", json=doc).status_code == 400
    doc = client.post("/tokenize", files=_files(PNG)).json()
    doc["items"][0]["coords"]["data"] = [[0, 0, 0, -1]] * doc["items"][0]["num_tokens"]
    r = client.post("/decode", json=doc)
    assert r.status_code == 422 and "non-negative" in r.json()["error"]["message"]


def test_a_bad_item_fails_alone(client):
    """A request whose tokens break the model runs beside good ones; only it fails."""
    good = client.post("/tokenize", files=_files(PNG)).json()
    bad = json.loads(json.dumps(good))
    bad["items"][0]["coords"]["data"] = [[0, 0, 0, 5000]] * bad["items"][0]["num_tokens"]
    with cf.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(client.post, "/decode", json=doc) for doc in (good, bad, good, bad, good, good)]
        codes = [f.result().status_code for f in futures]
    assert codes == [200, 422, 200, 422, 200, 200]


def test_concurrent_requests_are_batched(server):
    before = server.runtime.scheduler.batches
    with server.client() as c, cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: c.post("/encode", files=_files(JPG)), range(8)))
    assert all(r.status_code == 200 for r in results)
    assert server.runtime.scheduler.batches - before < 8
    assert max(int(r.headers["X-Batch-Size"]) for r in results) > 1


def test_metrics_exported(client):
    client.post("/encode", files=_files(PNG))
    text = client.get("/metrics").text
    for name in ("atoken_requests_total", "atoken_request_latency_seconds_bucket", "atoken_queue_depth",
                 "atoken_batch_size_bucket", "atoken_batch_tokens_bucket", "atoken_queue_drain_seconds",
                 "atoken_work_rate"):
        assert name in text
    assert 'route="/encode"' in text and 'modality="image"' in text


def test_unknown_route_is_json(client):
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_mesh_upload_reconstructs_to_gaussians(client):
    r = client.post("/reconstruct", files=_files(assets.mesh("airplane.ply")))
    assert r.status_code == 200, r.text
    from service.media.ply import ply_to_gaussians

    g = ply_to_gaussians(r.content)
    assert len(g["xyz"]) % 32 == 0 and np.abs(g["xyz"]).max() <= 0.5 + 0.75 / 64 + 1e-6  # offsets reach 0.75 voxel
    tok = client.post("/tokenize", files=_files(assets.mesh("cow.obj"))).json()
    assert tok["items"][0]["kind"] == "3D" and tok["items"][0]["media"]["source"] == "mesh"
    assert client.post("/decode", json=tok).content.startswith(b"ply")


def test_3d_preview_and_render_scores(server):
    # Splatting the untrained model's ~150k Gaussians on the front end's one thread takes
    # about 25 s per render here (preview, then scores): more than the default client timeout.
    with server.client(timeout=300) as client:
        r = client.post("/reconstruct?preview=grid&score=true", files=_files(assets.mesh("ant.ply")))
    assert r.status_code == 200, r.text
    names = zipfile.ZipFile(io.BytesIO(r.content)).namelist()
    assert names == ["item0.ply", "item0_preview.png"]
    png = zipfile.ZipFile(io.BytesIO(r.content)).read("item0_preview.png")
    assert Image.open(io.BytesIO(png)).size == (512, 512)
    assert float(r.headers["X-Render-PSNR"]) > 0 and 0 < float(r.headers["X-Render-SSIM"]) <= 1
