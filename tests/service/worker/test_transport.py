"""The hand-off to the worker: arrays through a reused shared-memory arena, whole messages
through the pipe when they do not fit, and no file left behind."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.api import Tokens
from service.worker import transport
from service.worker.backends import ProcessBackend
from service.worker.jobs import Job, JobResult, pixel_patches
from service.worker.loader import ModelSpec


def _pair(size: int = transport.ARENA_BYTES):
    writer = transport.Arena(size=size)
    reader = transport.Arena(writer.path)
    writer.forget_name()
    return writer, reader


def test_arena_round_trip_is_by_value_and_small_on_the_pipe():
    writer, reader = _pair()
    result = JobResult(3, embedding=torch.randn(64), tubelets=torch.randn(256, 3072),
                       tokens=Tokens(torch.zeros(256, 5, dtype=torch.int32), ("image",),
                                     latents=torch.randn(256, 48).to(torch.bfloat16)))
    message = transport.dumps([result], writer)
    assert len(message) < 4096  # offsets, not 3 MB of pixels
    back = transport.loads(message, reader)[0]
    writer.write([memoryview(np.ones(2**20, np.uint8))])  # the next message overwrites the arena
    assert torch.equal(back.tubelets, result.tubelets) and back.tubelets.numpy().flags.writeable
    assert back.tokens.latents.dtype == torch.bfloat16 and torch.equal(back.tokens.latents, result.tokens.latents)
    writer.close()
    reader.close()


def test_a_message_larger_than_the_arena_goes_through_the_pipe():
    writer, reader = _pair(size=2**16)
    big = [Job(1, "embed", batch=pixel_patches(np.full((1, 256, 256, 3), 7, np.uint8)))]
    message = transport.dumps(big, writer)
    assert len(message) > 2**16
    assert torch.equal(transport.loads(message, reader)[0].batch.feats, big[0].batch.feats)
    writer.close()
    reader.close()


def _arena_files() -> set[str]:
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
    return {f for f in os.listdir(folder) if f.startswith(f"atoken-{os.getpid()}-")} if folder else set()


@pytest.mark.parametrize("slots", [1, 2])
def test_process_worker_uses_arenas_and_leaves_no_files(slots):
    backend = ProcessBackend(ModelSpec(variant="tiny"), slots=slots)
    backend.start()
    try:
        assert not _arena_files()  # unlinked once the worker mapped them
        if os.path.exists(f"/proc/{backend.pid}/environ"):  # the measured OpenMP spin (docs/performance.md)
            environ = open(f"/proc/{backend.pid}/environ", "rb").read().split(b"\0")
            assert f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', '20000')}".encode() in environ
        jobs = [Job(i, "reconstruct", batch=pixel_patches(np.full((1, 32, 32, 3), 40 * i, np.uint8)))
                for i in range(3)]
        results = backend.run(jobs)
        assert [r.id for r in results] == [0, 1, 2]
        assert all(r.tubelets is not None and r.tubelets.shape == (4, 3072) for r in results)
    finally:
        backend.stop()
    assert backend._arenas == [] and not _arena_files()


_NO_ROOM = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file past the limit: EFBIG, as a full /dev/shm gives ENOSPC
resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
from service.worker import transport
try:
    transport.Arena(size=4 * 2**20)
except transport.ArenaUnavailable as exc:
    print("unavailable:", exc)
if __name__ == "__main__":
    import numpy as np
    from service.worker.backends import ProcessBackend
    from service.worker.jobs import Job, pixel_patches
    from service.worker.loader import ModelSpec
    backend = ProcessBackend(ModelSpec(variant="tiny"), slots=2)
    backend.start()
    try:
        jobs = [Job(i, "embed", batch=pixel_patches(np.full((1, 32, 32, 3), 9, np.uint8))) for i in range(2)]
        print("answers:", [r.id for r in backend.run(jobs)], "arenas:", backend._arenas)
    finally:
        backend.stop()
"""


def test_without_room_for_arenas_the_worker_goes_through_the_pipe(tmp_path):
    """Writing into a full tmpfs through a mapping is SIGBUS: the arenas' memory is reserved
    when they are made, and where it does not fit the worker runs without them."""
    script = tmp_path / "no_room.py"
    script.write_text(_NO_ROOM)
    before = _all_arena_files()
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[3], env={**os.environ, "PYTHONPATH": "."})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "unavailable: [Errno 27] no room for a 4 MiB arena" in done.stdout
    assert "answers: [0, 1] arenas: [(None, None), (None, None)]" in done.stdout
    assert "go through the pipe instead" in done.stderr
    assert _all_arena_files() <= before  # nothing half-made left behind


def _all_arena_files() -> set[str]:
    return {f for f in os.listdir("/dev/shm") if f.startswith("atoken-")} if os.path.isdir("/dev/shm") else set()


_DIES_STARTING = """
import os, signal
from service.worker import transport
arena = transport.Arena(size=2**20)  # the worker would map it now; this front end dies first
print(os.path.basename(arena.path), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_arenas_of_a_front_end_that_died_starting_are_freed_and_living_ones_kept(tmp_path):
    """A front end killed while its worker loads leaves its arenas named in /dev/shm (RAM, kept
    across a container's restarts in a pod); the next to make arenas unlinks them, not a living
    front end's."""
    living = transport.Arena(size=2**20)
    name = os.path.basename(living.path)
    try:
        script = tmp_path / "dies.py"
        script.write_text(_DIES_STARTING)
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                              cwd=Path(__file__).resolve().parents[3], env={**os.environ, "PYTHONPATH": "."})
        dead = done.stdout.strip()
        assert done.returncode == -9 and dead in _all_arena_files(), done.stderr[-2000:]
        freed = transport.reclaim_stale()
        assert dead in freed and dead not in _all_arena_files()
        assert name in _all_arena_files() and name not in freed
        worker_side = transport.Arena(living.path)  # still there for its worker to map
        assert worker_side.size == 2**20
        worker_side.close()
    finally:
        living.close()
    assert name not in _all_arena_files()
