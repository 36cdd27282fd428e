"""The real service as a separate process tree (`python -m service serve` and its model worker),
so a test can measure its memory from /proc, signal it, and kill its worker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class ServerProcess:
    def __init__(self, log_dir: Path, **settings):
        env = {k: v for k, v in os.environ.items() if not k.startswith("ATOKEN_")}
        env.update({"ATOKEN_VARIANT": "tiny", "ATOKEN_DEVICE": "cpu", "ATOKEN_JOBS_DIR": str(log_dir / "jobs")})
        env.update({f"ATOKEN_{k.upper()}": str(v) for k, v in settings.items()})
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{self.port}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self) -> "ServerProcess":
        self.wait_ready(180)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ready(self) -> bool:
        try:
            return httpx.get(self.url + "/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float) -> float:
        """Seconds until /readyz answered 200."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log()[-3000:]}")
            if self.ready():
                return time.monotonic() - start
            time.sleep(0.05)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()[-3000:]}")

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 60), **kw)

    # ------------------------------------------------------------------ processes and memory
    def pids(self) -> list[int]:
        """The server and every process below it (the model worker, multiprocessing helpers)."""
        pids, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            todo += _children(pid)
        return pids

    def worker_pid(self) -> int:
        """The running model worker: a spawned child (not multiprocessing's resource tracker),
        never a dead one waiting to be reaped (its cmdline is empty)."""
        for pid in self.pids()[1:]:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:  # exited meanwhile
                continue
            if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
                return pid
        raise RuntimeError("no model worker process")

    def reset_peaks(self) -> int:
        """Reset each process's peak RSS (VmHWM) to its current RSS; returns the summed RSS in kB."""
        total = 0
        for pid in self.pids():
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
                total += _status_kb(pid, "VmRSS")
            except OSError:
                pass
        return total

    def peak_kb(self) -> int:
        """Sum of peak RSS since the last reset, over the service's processes."""
        total = 0
        for pid in self.pids():
            try:
                total += _status_kb(pid, "VmHWM")
            except OSError:
                pass
        return total
