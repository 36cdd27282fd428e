"""Start a real Triton Inference Server (the binary inside the nvidia-pytriton wheel) with our
model repository, on loopback ports, for tests, benchmarks and single-machine use.

    python -m service.triton_launch [--http-port 8001]

In containers (docker/Dockerfile.triton, deploy/helm) the official Triton image's own
`tritonserver` is started through `python -m service.triton_launch exec --model-repository
/models`: the shared memory claim below, then the server in this process's place.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import httpx

from . import claims

ROOT = Path(__file__).resolve().parents[1]
MODEL_REPOSITORY = ROOT / "deploy" / "triton" / "model_repository"
SHM = "/dev/shm"
# The Python backend's own shared memory (a few MiB per server) is named with this prefix and
# an owner token; `<SHM>/<prefix><token>.lock` is flock-held for as long as the server (or a
# stub of its) lives. tritonserver killed outright cannot unlink its regions, and /dev/shm
# outlives it (a container restarted in its pod, a test run killed): the next launch frees them.
REGION_PREFIX = "atoken_triton_"
log = logging.getLogger("atoken.triton")


def _pytriton_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nvidia-pytriton is not installed (it carries the tritonserver binary)")
    return Path(spec.submodule_search_locations[0]) / "tritonserver"


def claim_regions(folder: str = SHM) -> tuple[int, str]:
    """(a descriptor holding the lock, the region prefix) for a new server's shared memory."""
    token = secrets.token_hex(6)
    return claims.create_claimed(os.path.join(folder, f"{REGION_PREFIX}{token}.lock")), f"{REGION_PREFIX}{token}_"


def reclaim_stale(folder: str = SHM) -> list[str]:
    """Unlinks the regions of servers that died without unlinking them (nobody holds their
    lock), and their lock files; -> the names freed. A living server's are left alone."""
    freed = []
    for lock in glob.glob(os.path.join(glob.escape(folder), f"{REGION_PREFIX}*.lock")):
        fd = claims.abandoned(lock)
        if fd is None:  # alive, gone meanwhile, or not ours to open
            continue
        for region in glob.glob(glob.escape(lock[:-len(".lock")]) + "_*"):
            claims.unlink(region)
            freed.append(os.path.basename(region))
        claims.unlink(lock)
        os.close(fd)
    return freed


def claim_after_reclaiming() -> tuple[int, str] | None:
    """What dead servers left freed, then a claim for a new one (None without a /dev/shm to
    use: the backend's default names, unowned)."""
    try:
        freed = reclaim_stale()
        if freed:
            log.warning("freed %d shared memory regions of Triton servers that had died: %s", len(freed), freed)
        return claim_regions()
    except OSError as exc:
        log.warning("Triton's shared memory is not claimed (%s)", exc)
        return None


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
        self.regions: tuple[int, str] | None = None  # (lock descriptor, prefix) when /dev/shm is there

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
        self.regions = claim_after_reclaiming()
        if self.regions:
            cmd.append(f"--backend-config=python,shm-region-prefix-name={self.regions[1]}")
        self.log = open(self.workdir / "tritonserver.log", "wb")
        # The server inherits the lock: its regions count as alive while it does, whatever
        # happens to this process.
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     pass_fds=(self.regions[0],) if self.regions else ())
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
        if self.regions:
            os.close(self.regions[0])
            self.regions = None
            reclaim_stale()  # its lock file, and any region it left; if a stub still holds it, the next launch
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def exec_tritonserver(args: list[str]) -> None:
    """Replaces this process by `tritonserver args...` with its shared memory claimed: what a
    server killed before (its container restarted in the same pod) left in /dev/shm is freed
    first. The server is the container's main process, as with a plain entry point."""
    regions = claim_after_reclaiming()
    if regions:
        os.set_inheritable(regions[0], True)  # held by the server, and by the stubs it starts
        args = [*args, f"--backend-config=python,shm-region-prefix-name={regions[1]}"]
    sys.stdout.flush()
    os.execvp("tritonserver", ["tritonserver", *args])


def main() -> None:
    if sys.argv[1:2] == ["exec"]:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        exec_tritonserver(sys.argv[2:])
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
