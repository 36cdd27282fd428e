"""A real uvicorn server on a free loopback port, running the real app and worker."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time

import httpx
import uvicorn

from service.app import create_app
from service.settings import Settings


class LiveServer:
    def __init__(self, **overrides):
        # Tests serve a randomly initialised tiny model (with a Gaussian decoder) unless told
        # otherwise, so they do not depend on the shipped default.
        # Each server gets its own jobs directory unless told otherwise (a restart test shares one).
        # A directory made here is removed when the server stops; one passed in is the caller's.
        self._own_jobs_dir = None if "jobs_dir" in overrides else tempfile.mkdtemp(prefix="atoken-jobs-")
        overrides.setdefault("jobs_dir", self._own_jobs_dir)
        self.settings = Settings(**{"variant": "tiny", **overrides})
        self.app = create_app(self.settings)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def runtime(self):
        return self.app.state.runtime

    def __enter__(self) -> "LiveServer":
        return self.start()

    def start(self, wait_ready: bool = True) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        if wait_ready:
            self.wait_ready(120)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if httpx.get(self.url + "/readyz").status_code == 200:
                return
            time.sleep(0.1)
        raise RuntimeError("server did not become ready")

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 60), **kw)

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        if self._own_jobs_dir and not self.thread.is_alive():
            shutil.rmtree(self._own_jobs_dir, ignore_errors=True)
