"""Start a real Triton Inference Server (the binary inside the nvidia-pytriton wheel) with our
model repository, on loopback ports, for tests, benchmarks and single-machine use.

    python -m service.triton_launch [--http-port 8001]

In containers, the official Triton image runs `tritonserver --model-repository
/models` directly (see docker/ and deploy/helm); this helper only assembles what the wheel
ships into the layout the server expects.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MODEL_REPOSITORY = ROOT / "deploy" / "triton" / "model_repository"


def _pytriton_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nvidia-pytriton is not installed (it carries the tritonserver binary)")
    return Path(spec.submodule_search_locations[0]) / "tritonserver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    def __init__(self, http_port: int | None = None, grpc_port: int | None = None, env: dict | None = None,
                 model_repository: Path = MODEL_REPOSITORY):
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.env = env or {}
        self.model_repository = model_repository
        self.proc: subprocess.Popen | None = None
        self.workdir = Path(tempfile.mkdtemp(prefix="atoken-triton-"))

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def _backends(self) -> Path:
        """backends/python with the stub built for this Python version."""
        src = _pytriton_dir()
        dst = self.workdir / "backends" / "python"
        shutil.copytree(src / "backends" / "python", dst)
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        shutil.copy2(src / "python_backend_stubs" / version / "triton_python_backend_stub", dst)
        return dst.parent

    def start(self, timeout: float = 180.0) -> "TritonServer":
        tritonserver = _pytriton_dir() / "bin" / "tritonserver"
        libs = [sysconfig.get_config_var("LIBDIR"), str(_pytriton_dir().parent.parent / "nvidia_pytriton.libs")]
        site = sysconfig.get_paths()["purelib"]
        env = {
            **os.environ, **self.env,
            "LD_LIBRARY_PATH": ":".join(libs + [os.environ.get("LD_LIBRARY_PATH", "")]),
            "ATOKEN_PYTHONPATH": os.pathsep.join([str(ROOT), site]),
            "PYTHONHOME": sys.base_prefix,
        }
        cmd = [str(tritonserver), f"--model-repository={self.model_repository}",
               f"--backend-directory={self._backends()}", f"--http-port={self.http_port}",
               f"--grpc-port={self.grpc_port}", "--allow-metrics=false", "--http-address=127.0.0.1",
               "--grpc-address=127.0.0.1", "--log-verbose=0", "--exit-on-error=true",
               "--disable-auto-complete-config"]
        self.log = open(self.workdir / "tritonserver.log", "wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                if httpx.get(f"http://{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"tritonserver not ready after {timeout:.0f} s:\n{self.tail()}")

    def tail(self, chars: int = 4000) -> str:
        path = self.workdir / "tritonserver.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if getattr(self, "log", None):
            self.log.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="run tritonserver with the AToken model repository")
    parser.add_argument("--http-port", type=int, default=8001)
    parser.add_argument("--grpc-port", type=int, default=8002)
    args = parser.parse_args()
    server = TritonServer(args.http_port, args.grpc_port).start()
    print(f"tritonserver ready on http://{server.url}; set ATOKEN_WORKER=triton ATOKEN_TRITON_URL={server.url}")
    try:
        server.proc.wait()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
