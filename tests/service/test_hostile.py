"""Hostile but honest clients against the real service process (issue: bounded cost).

Each case checks the status and JSON error, that the answer came fast, that the service's
processes (front end and model worker, from /proc) did not grow their peak RSS by more than
BOUND_MB while answering, and that the service is still ready afterwards."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import socket
import socketserver
import threading
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

from tests import assets
from tests.service.process_server import ServerProcess

BOUND_MB = 300  # peak RSS growth allowed for any one hostile case
FAST_S = 10.0  # a refusal comes within this, on any machine (they used to take 14-40 s)
KEY = "hostile-key"
AUTH = {"authorization": f"Bearer {KEY}"}
JPG = assets.image("rocket.jpg").read_bytes()
VIDEO = assets.video("bikes.mp4").read_bytes()  # 250 frames of 640x272
VIDEO_WORK_LIMIT = 150 * 640 * 272  # the whole clip is 250 frames' work; at 5 fps, 75
HELD_BODIES = 6 * 2**20  # JSON and token bodies in flight, together


@pytest.fixture(scope="module")
def files_server():
    """A loopback file server: counts requests; /slow trickles one byte a second."""
    hits = []

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            line = self.rfile.readline().decode("latin-1")
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            hits.append(line)
            if " /slow" in line:
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                for _ in range(60):  # bounded: a minute at most
                    try:
                        self.wfile.write(b"x")
                        self.wfile.flush()
                    except OSError:
                        return
                    time.sleep(1)
                return
            body = JPG
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("hostile"), api_keys=KEY, allow_url_fetch="true",
                       url_allowlist="127.0.0.1", fetch_timeout_s=2, body_idle_timeout_s=1, body_timeout_s=5,
                       max_queue_tokens=8192, max_video_pixels=VIDEO_WORK_LIMIT,
                       max_json_inflight_bytes=HELD_BODIES) as server:
        yield server


@pytest.fixture
def client(live):
    with live.client(headers=AUTH) as c:
        yield c


def measured(live, call):
    """(response, seconds, peak RSS growth in MB) of one call; the service must stay ready."""
    base_kb = live.reset_peaks()
    start = time.monotonic()
    response = call()
    seconds = time.monotonic() - start
    grown_mb = (live.peak_kb() - base_kb) / 1024
    assert live.ready(), "the service is not ready after a hostile request"
    return response, seconds, grown_mb


def expect(live, call, status: int, code: str | None = None, limit_key: bool = False):
    r, seconds, grown_mb = measured(live, call)
    assert r.status_code == status, (r.status_code, r.text[:500])
    if code:
        assert r.json()["error"]["code"] == code, r.text
    if limit_key:
        assert "limit" in r.json()["error"], r.text
    assert seconds < FAST_S, f"took {seconds:.1f} s"
    assert grown_mb < BOUND_MB, f"peak RSS grew by {grown_mb:.0f} MB"
    return r


# ---------------------------------------------------------------- inputs
def _array(arr: np.ndarray) -> dict:
    return {"dtype": str(arr.dtype), "shape": list(arr.shape), "data": base64.b64encode(arr.tobytes()).decode()}


def token_doc(kind: str, coords: list[tuple[int, int, int, int]], media: dict | None = None, width: int = 48) -> dict:
    c = np.asarray(coords, np.int32)
    item = {"kind": kind, "coords": _array(c), "latents": _array(np.zeros((len(c), width), np.float32))}
    if media is not None:
        item["media"] = media
    return {"items": [item]}


def grid(t: int, h: int, w: int) -> list[tuple[int, int, int, int]]:
    return [(a, b, c, 0) for a in range(t) for b in range(h) for c in range(w)]


def thin_png(width: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, 1), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


def obj_zip_bomb(inflated_gib: int = 1) -> bytes:
    """An OBJ+MTL zip of ~1.5 MB that inflates to `inflated_gib` GiB of vertex lines."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("model.mtl", b"newmtl red\nKd 1 0 0\n")
        with z.open("model.obj", "w", force_zip64=True) as f:
            f.write(b"mtllib model.mtl\nusemtl red\n")
            chunk = b"v 0 0 0\n" * (1 << 17)  # 1 MiB
            for _ in range(1024 * inflated_gib):
                f.write(chunk)
    return buf.getvalue()


def raw_request(live, head: str, body_part: bytes = b"", read_timeout: float = 15.0) -> tuple[int, bytes, float]:
    """Send a request line and headers (and perhaps part of a body) on a raw socket, then read
    the answer without sending the rest: (status, response bytes, seconds to the answer)."""
    with socket.create_connection(("127.0.0.1", live.port)) as s:
        s.settimeout(read_timeout)
        start = time.monotonic()
        s.sendall(head.encode() + body_part)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        seconds = time.monotonic() - start
        head_part, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head_part.lower().split(b"\r\n")
                       if line.startswith(b"content-length:")), 0)
        while len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1") else 0
        return status, head_part + b"\r\n\r\n" + body, seconds


# ---------------------------------------------------------------- /decode: coords and media
def test_one_token_far_away_is_refused(live, client):
    for x in (3000, 600):
        r = expect(live, lambda: client.post("/decode", json=token_doc("image", [(0, x, x, 0)])), 422,
                   "invalid_parameter", limit_key=True)
        assert "canvas" in r.json()["error"]["message"]


def test_decode_media_is_typed_and_bounded(live, client):
    image = grid(1, 2, 2)
    r = expect(live, lambda: client.post("/decode", json=token_doc("image", image, {"height": 20000, "width": 20000})),
               422, "invalid_parameter", limit_key=True)
    assert "pixels" in r.json()["error"]["message"]
    for bad in ("abc", 0, -5, 2.5, None, [1], True):
        expect(live, lambda: client.post("/decode", json=token_doc("image", image, {"height": bad, "width": 32})),
               422, "invalid_parameter")
    video = grid(2, 2, 2)
    for fps in (float("nan"), float("inf"), -1, 0, "x"):
        body = json.dumps(token_doc("video", video, {"fps": fps, "frames": 8}))  # NaN as the JSON literal
        expect(live, lambda: client.post("/decode", content=body, headers={"content-type": "application/json"}),
               422, "invalid_parameter")
    expect(live, lambda: client.post("/decode", json=token_doc("video", video, {"frames": 99})), 422,
           "invalid_parameter")
    # The same tokens with honest media decode fine.
    r = expect(live, lambda: client.post("/decode", json=token_doc("image", image, {"height": 48, "width": 40})), 200)
    assert Image.open(io.BytesIO(r.content)).size == (40, 48)


def test_token_sets_must_be_whole(live, client):
    holes = grid(1, 3, 3)[:-1]
    expect(live, lambda: client.post("/decode", json=token_doc("image", holes)), 422, "invalid_parameter")
    dup = grid(1, 2, 2) + [(0, 0, 0, 0)]
    expect(live, lambda: client.post("/decode", json=token_doc("image", dup)), 422, "invalid_parameter")
    expect(live, lambda: client.post("/decode", json=token_doc("image", [(0, 0, 0, 0)], width=7)), 422,
           "invalid_parameter")
    expect(live, lambda: client.post("/decode", json=token_doc("3D", [(1, 70, 0, 0)])), 422, "invalid_parameter")
    lying = token_doc("image", grid(1, 2, 2))
    lying["items"][0]["latents"]["shape"] = [4000000, 48]  # declared size does not match the data
    expect(live, lambda: client.post("/decode", json=lying), 400, "bad_request")


# ---------------------------------------------------------------- uploads
def test_thin_images_are_refused_not_upscaled(live, client):
    for width in (60000, 100000):
        data = thin_png(width)
        assert len(data) < 2000
        for route in ("/encode", "/reconstruct"):
            r = expect(live, lambda: client.post(route, content=data, headers={"content-type": "image/png"}),
                       422, "out_of_range", limit_key=True)
            assert "aspect ratio" in r.json()["error"]["message"]


def test_zip_bomb_mesh_is_refused_before_inflating(live, client):
    bomb = obj_zip_bomb(1)
    assert len(bomb) < 4 * 2**20
    r = expect(live, lambda: client.post("/reconstruct", files={"file": ("bomb.zip", bomb)}), 413, "too_large",
               limit_key=True)
    assert "inflated" in r.json()["error"]["message"]


def test_deep_and_huge_json(live, client):
    deep = ("[" * 100_000 + "]" * 100_000).encode()
    for route in ("/decode", "/encode"):
        expect(live, lambda: client.post(route, content=deep, headers={"content-type": "application/json"}),
               400, "bad_request", limit_key=True)
    nested = {"items": [{"kind": "image", "media": {"a": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}}]}
    expect(live, lambda: client.post("/decode", json=nested), 400, "bad_request")
    # 240 MB declared: refused from the headers, before any of it is read.
    status, data, seconds = raw_request(
        live, f"POST /decode HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
              f"Content-Length: {240 * 2**20}\r\n\r\n", b'{"items": [')
    assert status == 413 and b"too_large" in data and seconds < FAST_S


def test_video_options_are_validated(live, client):
    for query in ("fps=nan", "fps=inf", "fps=-2", "start=nan", "max_frames=0", "start=5&end=1", "dense=maybe"):
        route = "/encode" if "dense" in query else "/reconstruct"
        expect(live, lambda: client.post(f"{route}?{query}", files={"file": ("v.mp4", VIDEO)}), 422,
               "invalid_parameter")


def test_a_video_that_would_take_too_long_to_decode_is_refused_from_its_header(live, client):
    """Decoding work (source pixels, a dropped frame an eighth) over ATOKEN_MAX_VIDEO_PIXELS is
    413 before a frame is decoded, on every video route; fewer frames kept fit."""
    for route in ("/encode", "/tokenize", "/reconstruct"):
        r = expect(live, lambda: client.post(route, files={"file": ("v.mp4", VIDEO)}), 413, "too_large",
                   limit_key=True)
        assert r.json()["error"]["limit"] == VIDEO_WORK_LIMIT and "max_video_pixels" in r.json()["error"]["message"]
    r = expect(live, lambda: client.post("/tokenize?fps=5", files={"file": ("v.mp4", VIDEO)}), 200)
    assert r.json()["items"][0]["media"]["frames"] == 50
    assert client.get("/info").json()["limits"]["max_video_pixels"] == VIDEO_WORK_LIMIT


def test_json_bodies_in_flight_share_one_memory_budget(live, client):
    """JSON and token bodies are held in memory while answered: their declared sizes together
    stay within ATOKEN_MAX_JSON_INFLIGHT_BYTES. One arriving slowly holds its share; another
    that would pass the budget is 429 at once, before its body is read; one that could never
    fit is 413; once the slow one ends, the room is back."""
    two_mib = json.dumps({"items": [{"kind": "image", "pad": "x" * (2 * 2**20 - 40)}]}).encode()
    with socket.create_connection(("127.0.0.1", live.port)) as slow:
        slow.sendall(f"POST /decode HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {5 * 2**20}\r\n\r\n{{".encode())
        deadline = time.monotonic() + 5
        while _held(client) < 5 * 2**20:
            assert time.monotonic() < deadline, "the slow body was never counted"
            time.sleep(0.02)
        r = expect(live, lambda: client.post("/decode", content=two_mib, headers={"content-type": "application/json"}),
                   429, "overloaded", limit_key=True)
        assert r.json()["error"]["limit"] == HELD_BODIES and "Retry-After" in r.headers
    r = expect(live, lambda: client.post("/decode", content=b"{" + b" " * (HELD_BODIES + 1) + b"}",
                                         headers={"content-type": "application/json"}), 413, "too_large")
    assert "never fit" in r.json()["error"]["message"]
    deadline = time.monotonic() + 10
    while _held(client):
        assert time.monotonic() < deadline, "the slow body's share was never given back"
        time.sleep(0.05)
    r = client.post("/decode", content=two_mib, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "coords" in r.text, r.text[:300]  # read and judged: not a token document


def _held(client) -> float:
    import re

    return float(re.search(r"^atoken_held_body_bytes (\S+)$", client.get("/metrics").text, re.M).group(1))


def test_many_large_outputs_are_never_all_held_in_memory(live, client):
    """A few MB of tokens may ask for 16 images of 2048x2048: each output goes to a file as it
    is made, and the zip is written from the files. The service's peak memory grew by 149 MB
    for the 128 MB answer (the model's batch, one output at a time); with the outputs held, then
    zipped in memory, by 416 MB, and with the count of files)."""
    noise = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((256, 256, 3)) * 255).astype(np.uint8)).save(noise, "PNG")
    tokens = client.post("/tokenize", files={"file": ("n.png", noise.getvalue())}).json()["items"][0]
    item = {"kind": "image", "coords": tokens["coords"], "latents": tokens["latents"],
            "media": {"height": 2048, "width": 2048}}
    r, seconds, grown_mb = measured(live, lambda: client.post("/decode", json={"items": [item] * 16}))
    assert r.status_code == 200, r.text[:300]
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        assert len(z.namelist()) == 16
    answer_mb = len(r.content) / 2**20
    assert answer_mb > 64  # frames of noise: large PNGs
    assert grown_mb < 1.5 * answer_mb, f"peak RSS grew by {grown_mb:.0f} MB for a {answer_mb:.0f} MB answer"


def test_a_request_that_can_never_fit_is_413_not_429(live, client):
    big = io.BytesIO()
    Image.new("RGB", (512, 512), (9, 99, 199)).save(big, "PNG")
    files = [("file", (f"{i}.png", big.getvalue())) for i in range(5)]  # 5 x 1024 tokens x 2 passes > 8192
    r = expect(live, lambda: client.post("/reconstruct", files=files), 413, "too_large", limit_key=True)
    assert "never fit" in r.json()["error"]["message"]


# ---------------------------------------------------------------- refuse early
def test_unauthenticated_uploads_are_refused_before_reading(live):
    status, data, seconds = raw_request(
        live, f"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {200 * 2**20}\r\n\r\n",
        b"\x89PNG")
    assert status == 401 and b"www-authenticate" in data.lower() and seconds < FAST_S
    body = b"\0" * (64 * 2**20)

    def upload(_):
        with live.client() as c:
            return c.post("/encode", content=body, headers={"content-type": "application/octet-stream"})

    def eight():
        with cf.ThreadPoolExecutor(8) as pool:
            return list(pool.map(upload, range(8)))

    responses, seconds, grown_mb = measured(live, eight)
    assert [r.status_code for r in responses] == [401] * 8
    assert grown_mb < BOUND_MB, f"peak RSS grew by {grown_mb:.0f} MB"


def test_urls_are_counted_before_downloading(live, client, files_server):
    base, hits = files_server
    hits.clear()
    r = expect(live, lambda: client.post("/encode", json={"urls": [f"{base}/{i}.jpg" for i in range(40)]}), 413,
               "too_large", limit_key=True)
    assert hits == [], "nothing may be downloaded before the count is checked"
    expect(live, lambda: client.post("/encode", json={"urls": [f"{base}/ok.jpg"]}), 200)
    expect(live, lambda: client.post("/encode", json={"urls": ["http://127.0.0.1\t/x.jpg"]}), 422,
           "invalid_parameter")
    expect(live, lambda: client.post("/encode", json={"urls": [12]}), 422, "invalid_parameter")


def test_a_trickling_url_hits_its_deadline(live, client, files_server):
    base, _ = files_server
    r = expect(live, lambda: client.post("/encode", json={"urls": [f"{base}/slow"]}), 504, "deadline_exceeded")
    assert r.json()["error"]["limit"] == 2


# ---------------------------------------------------------------- timeouts
def test_slow_bodies_time_out_and_do_not_block_others(live, client):
    head = (f"POST /encode HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {len(JPG)}\r\n\r\n")
    socks = []
    try:
        for _ in range(50):  # stalled uploads hold nothing but a socket until their deadline
            s = socket.create_connection(("127.0.0.1", live.port))
            s.sendall(head.encode() + JPG[:100])
            socks.append(s)
        r = client.post("/encode", files={"file": ("a.jpg", JPG)})
        assert r.status_code == 200
        for s in socks:
            s.settimeout(15)
            data = b""
            while chunk := s.recv(65536):  # the server closes the connection after a 408
                data += chunk
            assert data.startswith(b"HTTP/1.1 408"), data[:200]
            assert b"request_timeout" in data
    finally:
        for s in socks:
            s.close()
    assert live.ready()


def _count(metrics: str, route: str, status: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("atoken_requests_total{") and f'route="{route}"' in line
               and f'status="{status}"' in line)


def test_a_client_that_leaves_mid_body_is_a_499_not_a_bug(live, client):
    """Starlette raises ClientDisconnect where a body is read; it used to be answered (to nobody)
    as a 500, counted as one and logged with its traceback as an unhandled error."""
    boundary = "b0undary"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + JPG + f"\r\n--{boundary}--\r\n".encode()
    cases = [("/encode", f"multipart/form-data; boundary={boundary}", form), ("/tokenize", "image/jpeg", JPG),
             ("/decode", "application/json", b'{"items": [' + b" " * 200_000)]
    before = client.get("/metrics").text
    for route, ctype, body in cases:
        with socket.create_connection(("127.0.0.1", live.port)) as s:
            s.sendall(f"POST {route} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                      f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:len(body) // 2])
            time.sleep(0.2)  # the server is reading the body when the client leaves
    deadline = time.monotonic() + FAST_S
    while True:
        after = client.get("/metrics").text
        left = [r for r, _, _ in cases if _count(after, r, "499") - _count(before, r, "499") < 1]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not left, f"no 499 counted on {left}"
    assert all(_count(after, r, "500") == _count(before, r, "500") for r, _, _ in cases)
    assert "unhandled error" not in live.log()
    assert live.ready()


# ---------------------------------------------------------------- protocol
def test_allow_www_authenticate_and_head(live, client):
    r = client.delete("/encode")
    assert r.status_code == 405 and "POST" in r.headers["allow"]
    r = client.post("/healthz")
    assert r.status_code == 405 and "GET" in r.headers["allow"]
    with live.client() as anonymous:
        r = anonymous.post("/encode", content=JPG)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        r = anonymous.head("/healthz")
        assert r.status_code == 200 and r.content == b"" and r.headers["content-type"] == "application/json"
    assert client.head("/info").status_code == 200


def test_every_response_is_counted(live, client):
    client.get("/nowhere")
    client.post("/decode", content=b"{", headers={"content-type": "application/json"})
    text = client.get("/metrics").text
    assert 'atoken_requests_total{modality="none",route="other",status="404"}' in text
    assert 'route="/decode",status="400"' in text
