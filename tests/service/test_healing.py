"""Self-healing on the real service process: a worker that dies idle or busy is restarted with
no traffic needed, SIGTERM to the whole process group drains in-flight work, a worker that
cannot start fails liveness, and a bug answers a JSON 500 on a connection that stays usable."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import httpx

from tests import assets
from tests.service.process_server import ServerProcess
from tests.service.server import LiveServer

READY_AGAIN_S = 5.0
VIDEO = assets.video("bikes.mp4").read_bytes()
JPG = assets.image("rocket.jpg").read_bytes()


def _gauge(client: httpx.Client, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+-]+)$", client.get("/metrics").text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _wait_running(live: ServerProcess, client: httpx.Client, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _gauge(client, "atoken_running_jobs") == 0:
        assert time.monotonic() < deadline, "the request never reached the worker"
        time.sleep(0.01)


def _long_request(live: ServerProcess, outcome: dict) -> threading.Thread:
    def run():
        with live.client(timeout=120) as c:
            outcome["r"] = c.post("/reconstruct?max_frames=64", files={"file": ("v.mp4", VIDEO)})

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _exited(pid: int) -> bool:
    """Every thread of the process has died (zombies waiting to be reaped, or gone). The main
    thread alone is not enough: it turns zombie while the others still tear down, and until
    the last one has, the process keeps its files and its parent cannot see it exit."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return True
    for task in tasks:
        try:
            if Path(f"/proc/{pid}/task/{task}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                return False
        except FileNotFoundError:
            continue
    return True


def _ready_again_without_traffic(live: ServerProcess, old_pid: int) -> float:
    """Seconds until /readyz answers 200 again with a new worker (probes only, no requests).
    Probing starts once the killed worker has died: SIGKILL is delivered asynchronously, and on
    a busy machine /readyz could be asked while the old worker was still running, rightly
    answering ready with it."""
    start = time.monotonic()
    while not _exited(old_pid):
        assert time.monotonic() - start < 10, "the killed worker did not die"
        time.sleep(0.005)
    while time.monotonic() - start < 60:
        if live.ready():
            pid = live.worker_pid()
            assert pid != old_pid
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"not ready 60 s after the worker died:\n{live.log()[-2000:]}")


def test_worker_killed_idle_or_busy_is_back_within_seconds(tmp_path):
    with ServerProcess(tmp_path, max_side=256, max_frames=64) as live, live.client() as c:
        pid = live.worker_pid()
        os.kill(pid, signal.SIGKILL)  # idle: nobody will send a request to notice
        idle_s = _ready_again_without_traffic(live, pid)
        assert idle_s < READY_AGAIN_S, f"ready again after {idle_s:.1f} s"
        assert c.get("/healthz").json()["restarts"] == 1

        outcome: dict = {}
        thread = _long_request(live, outcome)
        _wait_running(live, c)
        pid = live.worker_pid()
        os.kill(pid, signal.SIGSTOP)  # hold the batch so the kill certainly lands mid-batch
        os.kill(pid, signal.SIGKILL)
        thread.join(60)
        assert outcome["r"].status_code == 503 and outcome["r"].json()["error"]["code"] == "worker_unavailable"
        busy_s = _ready_again_without_traffic(live, pid)
        assert busy_s < READY_AGAIN_S, f"ready again after {busy_s:.1f} s"
        assert c.post("/encode", files={"file": ("a.jpg", JPG)}).status_code == 200
        assert c.get("/healthz").json()["restarts"] == 2


def test_sigterm_to_the_process_group_drains_in_flight_work(tmp_path):
    live = ServerProcess(tmp_path, max_side=256, max_frames=64).__enter__()
    try:
        with live.client() as c:
            outcome: dict = {}
            thread = _long_request(live, outcome)
            _wait_running(live, c)
        os.killpg(live.proc.pid, signal.SIGTERM)  # what Kubernetes and Ctrl-C in a shell do
        thread.join(120)
        assert outcome["r"].status_code == 200, outcome["r"].text
        assert outcome["r"].headers["content-type"] == "video/mp4"
        # uvicorn re-raises the signal once it has shut down gracefully, as a shell expects.
        assert live.proc.wait(60) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in live.log() and "Traceback" not in live.log()
    finally:
        live.stop()


def test_liveness_fails_when_the_worker_cannot_start():
    server = LiveServer(worker="thread", variant=None, checkpoint="/nonexistent/model.safetensors",
                        liveness_failures=2)
    server.start(wait_ready=False)
    try:
        deadline = time.monotonic() + 60
        while httpx.get(server.url + "/healthz").status_code == 200:
            assert time.monotonic() < deadline, "liveness never failed"
            time.sleep(0.1)
        health = httpx.get(server.url + "/healthz")
        assert health.status_code == 503 and health.json()["status"] == "failing"
        assert "nonexistent" in health.json()["last_error"]
        assert httpx.get(server.url + "/readyz").status_code == 503
        r = httpx.post(server.url + "/encode", content=JPG)
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
    finally:
        server.__exit__(None, None, None)


def test_a_bug_answers_json_500_keeps_the_connection_and_is_counted(monkeypatch):
    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr("service.runtime.preprocess", broken)
    with LiveServer(worker="thread") as live:
        host, port = live.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("POST", "/encode", body=JPG, headers={"content-type": "image/jpeg"})
        first = conn.getresponse()
        body = json.loads(first.read())
        assert first.status == 500 and body["error"] == {"code": "internal_error", "message": "internal error"}
        conn.request("GET", "/healthz")  # the same connection
        assert conn.getresponse().status == 200
        conn.close()
        assert 'route="/encode",status="500"' in httpx.get(live.url + "/metrics").text
