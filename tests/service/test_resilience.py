"""Overload, deadlines, a killed worker, auth and request limits, each on its own server."""

import concurrent.futures as cf
import os
import signal
import threading
import time

import httpx
import pytest

from tests import assets
from tests.service.server import LiveServer

JPG = assets.image("rocket.jpg")
VIDEO = assets.video("bikes.mp4")


def _files(path):
    return [("file", (path.name, path.read_bytes(), "application/octet-stream"))]


def test_overload_answers_429_with_retry_after():
    with LiveServer(worker="process", max_queue_jobs=1, max_inflight_requests=2, max_side=512) as live:
        with live.client() as c, cf.ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda _: c.post("/reconstruct", files=_files(JPG)), range(12)))
        codes = [r.status_code for r in results]
        assert 429 in codes and 200 in codes, codes
        busy = next(r for r in results if r.status_code == 429)
        assert int(busy.headers["Retry-After"]) >= 1
        assert busy.json()["error"]["code"] == "overloaded"
        # ... and it keeps serving afterwards.
        with live.client() as c:
            assert c.post("/encode", files=_files(JPG)).status_code == 200


def test_deadline_answers_504():
    """A request admitted in time whose answer is late (here the worker is stopped) gets 504."""
    with LiveServer(worker="process", request_timeout_s=1.0, max_side=512) as live, live.client() as c:
        pid = live.runtime.scheduler.backend.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            r = c.post("/encode", files=_files(JPG))
        finally:
            os.kill(pid, signal.SIGCONT)
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        assert r.json()["error"]["limit"] == 1.0
        assert c.post("/encode", files=_files(JPG)).status_code == 200


def test_work_that_could_not_finish_in_time_is_refused_before_it_runs():
    """The worker's measured rate prices the request: more model time than the deadline is a
    413 naming it, before any batch runs (here the rate is made slow, as on a much slower CPU:
    an image's reconstruction prices at about 10 minutes). A job has its own, longer deadline."""
    with LiveServer(worker="process", max_side=512) as live, live.client() as c:
        scheduler = live.runtime.scheduler
        work = c.get("/info").json()["model"]["work"]  # measured when the worker started
        # the decoder is the encoder's size: a pass costs at least one of the encoder's
        assert work["per_s"] > 0 and work["decoder_pass"] >= 1 and work["attention_crossover"] == 2 * 256 + 1024
        batches, rate = scheduler.batches, scheduler._rate
        scheduler._rate = 1.0
        try:
            r = c.post("/reconstruct", files=_files(JPG))
            assert r.status_code == 413 and r.json()["error"]["code"] == "too_large", r.text
            assert r.json()["error"]["limit"] == live.runtime.settings.request_timeout_s
            assert "(request_timeout_s)" in r.json()["error"]["message"]
            assert "job API (POST /jobs/{op}" in r.json()["error"]["message"]  # the remedy, tried below
            assert scheduler.batches == batches
            job = c.post("/jobs/reconstruct", files=_files(JPG)).json()
            deadline = time.monotonic() + 60
            while job["status"] not in ("succeeded", "failed") and time.monotonic() < deadline:
                time.sleep(0.05)
                job = c.get(job["links"]["self"]).json()
            assert job["status"] == "succeeded", job  # priced within job_timeout_s (3600 s)
        finally:
            scheduler._rate = rate
        assert c.post("/reconstruct", files=_files(JPG)).status_code == 200


def test_killed_worker_gives_503_then_recovers():
    with LiveServer(worker="process", max_side=256, max_frames=64) as live:
        scheduler = live.runtime.scheduler
        pid = scheduler.backend.pid
        outcome = {}

        def slow_request():
            with live.client() as c:
                outcome["r"] = c.post("/reconstruct?max_frames=64", files=_files(VIDEO))

        t = threading.Thread(target=slow_request)
        t.start()
        deadline = time.monotonic() + 30
        while scheduler.running_batch == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(pid, signal.SIGSTOP)  # the batch cannot finish between the check and the kill
        assert scheduler.running_batch > 0, "the request never reached the worker"
        os.kill(pid, signal.SIGKILL)
        t.join(60)
        r = outcome["r"]
        assert r.status_code == 503 and r.json()["error"]["code"] == "worker_unavailable"
        assert "died" in r.json()["error"]["message"]
        live.wait_ready(120)
        assert scheduler.backend.pid != pid and scheduler.restarts == 1
        with live.client() as c:
            assert c.post("/encode", files=_files(JPG)).status_code == 200
            assert "atoken_worker_restarts 1.0" in c.get("/metrics").text


def test_api_keys(tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("from-file-key\n")
    with LiveServer(worker="thread", api_keys="k1,k2", api_key_file=str(key_file)) as live, live.client() as c:
        assert c.post("/encode", files=_files(JPG)).status_code == 401
        assert c.post("/encode", files=_files(JPG), headers={"authorization": "Bearer nope"}).status_code == 401
        assert c.post("/encode", files=_files(JPG), headers={"authorization": "Bearer k2"}).status_code == 200
        assert c.post("/encode", files=_files(JPG), headers={"x-api-key": "from-file-key"}).status_code == 200
        assert c.get("/info").status_code == 401
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200


def test_request_body_limit_and_url_policy():
    with LiveServer(worker="thread", max_request_bytes=50_000) as live, live.client() as c:
        r = c.post("/encode", content=JPG.read_bytes(), headers={"content-type": "image/jpeg"})
        assert r.status_code == 413 and r.json()["error"]["limit"] == 50_000

        def chunks():  # no Content-Length: counted while streaming
            data = JPG.read_bytes()
            for i in range(0, len(data), 8192):
                yield data[i:i + 8192]

        r = c.post("/encode", content=chunks(), headers={"content-type": "image/jpeg"})
        assert r.status_code == 413
        r = c.post("/encode", json={"urls": ["http://example.com/a.png"]})
        assert r.status_code == 422 and "disabled" in r.json()["error"]["message"]


def test_url_fetch_from_an_allowlisted_loopback_host(tmp_path):
    import http.server
    import socketserver

    (tmp_path / "rocket.jpg").write_bytes(JPG.read_bytes())
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    with socketserver.TCPServer(("127.0.0.1", 0), handler) as files:
        threading.Thread(target=files.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{files.server_address[1]}/rocket.jpg"
        with LiveServer(worker="thread", allow_url_fetch=True, url_allowlist="127.0.0.1") as live, live.client() as c:
            assert c.post("/encode", json={"urls": [url]}).status_code == 200
            other = url.replace("127.0.0.1", "localhost")
            r = c.post("/encode", json={"urls": [other]})
            assert r.status_code == 422 and "allowlist" in r.json()["error"]["message"]
        files.shutdown()


def test_work_of_a_disconnected_client_is_dropped():
    """A request queued behind a running batch whose client leaves never reaches the model.

    The worker is paused (SIGSTOP) while it runs the first batch, so the second request is
    certainly still queued when its client gives up, however fast the machine is. One batch in
    flight (no lane batches): with a slot per lane, the image's job took the second slot
    whenever it came before the video's next tile, and went to the paused worker."""
    with LiveServer(worker="process", max_side=256, max_frames=64, max_batch_tokens=3600, max_wait_ms=1,
                    lane_batches=False) as live:
        scheduler = live.runtime.scheduler
        done = {}

        def long_request():
            with live.client() as c:
                done["video"] = c.post("/reconstruct?max_frames=64", files=_files(VIDEO)).status_code

        t = threading.Thread(target=long_request)
        t.start()
        deadline = time.monotonic() + 30
        while scheduler.running_batch == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert scheduler.running_batch > 0, "the request never reached the worker"
        os.kill(scheduler.backend.pid, signal.SIGSTOP)
        try:
            batches_before = scheduler.batches
            with pytest.raises(httpx.TimeoutException):
                with live.client(timeout=2.0) as c:  # gives up while its job waits in the queue
                    c.post("/encode", files=_files(JPG))
            # The video's next tile is queued too (it streams); the image's job is the one left.
            deadline = time.monotonic() + 10
            embeds = [p for p in scheduler._queue if p.job.op == "embed"]
            while not all(p.cancelled for p in embeds) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(embeds) == 1 and embeds[0].cancelled
        finally:
            os.kill(scheduler.backend.pid, signal.SIGCONT)
        t.join(60)
        deadline = time.monotonic() + 10
        while scheduler.dropped == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert done["video"] == 200
        assert scheduler.dropped == 1
        assert scheduler.batches > batches_before  # the video's tiles ran on; the image's job never did
        with live.client() as c:
            assert "atoken_dropped_jobs 1.0" in c.get("/metrics").text


def test_a_hung_worker_is_killed_after_its_batchs_deadline_and_restarted(monkeypatch):
    """Nothing answers for a stopped worker, which looks alive: the watchdog kills it once its
    batch outlives its deadline by HUNG_AFTER_S (60 s; 1 s here), and the scheduler restarts it."""
    from service import scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "HUNG_AFTER_S", 1.0)
    with LiveServer(worker="process", request_timeout_s=1.0, max_side=512) as live, live.client() as c:
        scheduler = live.runtime.scheduler
        pid = scheduler.backend.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            r = c.post("/encode", files=_files(JPG))
            assert r.status_code == 504, r.text
            deadline = time.monotonic() + 60
            while scheduler.restarts == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert scheduler.restarts == 1
            assert _gone(pid)  # killed, not left stopped
        finally:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        live.wait_ready(60)
        assert scheduler.backend.pid != pid
        assert c.post("/encode", files=_files(JPG)).status_code == 200


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # dead, not yet reaped
    except FileNotFoundError:
        return True


def test_a_job_waits_out_a_full_queue_past_the_request_timeout():
    """A job retries a full queue for as long as its own deadline (job_timeout_s), not the
    request's, a video's tiles too: here the queue reads full for 3 s against a 1 s request
    timeout."""
    with LiveServer(worker="process", request_timeout_s=1.0, max_side=512, jobs_concurrency=2) as live, live.client() as c:
        scheduler = live.runtime.scheduler
        full = scheduler.config.max_queue_tokens
        scheduler._queued_cost += full
        try:
            assert c.post("/encode", files=_files(JPG)).status_code == 429
            jobs = [c.post("/jobs/encode?max_frames=8", files=_files(path)).json() for path in (JPG, VIDEO)]
            time.sleep(3)
            assert [c.get(job["links"]["self"]).json()["status"] for job in jobs] == ["running", "running"]
        finally:
            scheduler._queued_cost -= full
        for job in jobs:
            deadline = time.monotonic() + 60
            while job["status"] not in ("succeeded", "failed") and time.monotonic() < deadline:
                time.sleep(0.05)
                job = c.get(job["links"]["self"]).json()
            assert job["status"] == "succeeded", job
