"""The shared-memory regions that carry Triton request inputs: reuse, growth, cleanup."""

import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

pytest.importorskip("tritonclient")

from service.triton_shm import ALIGN, MIN_REGION, RegionPool, region_bytes  # noqa: E402
from tests.conftest import ROOT  # noqa: E402


class FakeServer:
    def __init__(self, fail: bool = False):
        self.registered: dict[str, int] = {}
        self.fail = fail
        self.lock = threading.Lock()

    def register(self, name: str, key: str, size: int) -> None:
        assert os.path.exists("/dev/shm" + key), "registered before the memory exists"
        if self.fail:
            raise RuntimeError("cannot map")
        with self.lock:
            self.registered[name] = size

    def unregister(self, name: str) -> None:
        with self.lock:
            del self.registered[name]


def _shm_files(prefix: str, lock: bool = True) -> list[str]:
    """The pool's files in /dev/shm: its regions, and with `lock` its lock file."""
    return [f for f in os.listdir("/dev/shm") if f.startswith(prefix) and (lock or not f.endswith(".lock"))]


def test_regions_are_reused_grown_and_freed():
    server = FakeServer()
    pool = RegionPool(server.register, server.unregister)
    a = pool.take(1000)
    assert a.size == MIN_REGION and server.registered == {a.name: MIN_REGION}
    pool.give(a)
    assert pool.take(MIN_REGION) is a  # reused, not registered again
    b = pool.take(10)  # a is held: a second request gets its own region
    assert b is not a and len(server.registered) == 2
    pool.give(a)
    pool.give(b)
    big = pool.take(3 * MIN_REGION)  # nothing free fits: a free one is replaced, not added
    assert big.size == 4 * MIN_REGION and len(server.registered) == 2
    prefix = big.name.rsplit("-", 1)[0]
    assert len(_shm_files(prefix, lock=False)) == 2
    pool.give(big)
    pool.close()
    assert server.registered == {} and _shm_files(prefix) == []


def test_a_region_held_while_the_pool_closes_is_freed_when_given_back():
    server = FakeServer()
    pool = RegionPool(server.register, server.unregister)
    idle, busy = pool.take(10), pool.take(10)
    pool.give(idle)
    pool.close()
    assert list(server.registered) == [busy.name]  # the request on the wire keeps its memory
    busy.write({"x": np.arange(10, dtype=np.uint8)})
    pool.give(busy)
    assert server.registered == {} and _shm_files(pool._prefix) == []


def test_write_places_arrays_aligned_and_intact():
    server = FakeServer()
    pool = RegionPool(server.register, server.unregister)
    rng = np.random.default_rng(0)
    arrays = {"PIXELS": rng.integers(0, 255, (1, 300, 768), dtype=np.uint8),
              "COORDS": rng.integers(0, 16, (1, 300, 5), dtype=np.int32),
              "META": np.frombuffer(b'{"jobs": []}', np.uint8)[None]}
    region = pool.take(region_bytes(arrays))
    placed = region.write(arrays)
    for name, value in arrays.items():
        offset, nbytes = placed[name]
        assert offset % ALIGN == 0 and nbytes == value.nbytes
        back = np.ndarray(value.shape, value.dtype, buffer=region.view, offset=offset)
        assert np.array_equal(back, value)
    spans = sorted(placed.values())
    assert all(o1 + n1 <= o2 for (o1, n1), (o2, _) in zip(spans, spans[1:]))  # no overlap
    pool.give(region)
    pool.close()


def test_a_server_that_cannot_map_leaves_nothing_behind():
    server = FakeServer(fail=True)
    pool = RegionPool(server.register, server.unregister)
    with pytest.raises(RuntimeError, match="cannot map"):
        pool.take(10)
    assert _shm_files(pool._prefix, lock=False) == []
    pool.close()
    assert _shm_files(pool._prefix) == []


def _dead_pool(tmp_path, keep_files: bool = False) -> list[str]:
    """A pool in another process, killed (SIGKILL) while holding two regions: -> their names.
    `keep_files`: its region files outlive it (no resource tracker to unlink them)."""
    code = (
        "import os, signal\n"
        + ("from multiprocessing import resource_tracker\nresource_tracker.register = lambda *a: None\n"
           if keep_files else "")
        + "from service.triton_shm import RegionPool\n"
        "pool = RegionPool(lambda name, key, size: None, lambda name: None)\n"
        "print(pool.take(10).name, pool.take(10).name, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    return run.stdout.split()


def test_regions_of_a_pool_that_died_are_reclaimed_and_living_ones_kept(tmp_path):
    dead = _dead_pool(tmp_path)
    dead_prefix = dead[0].rsplit("-", 1)[0]
    # Its region files may already be gone (multiprocessing's resource tracker unlinks what a
    # dead process leaves), but a server that registered them keeps them mapped, and its lock
    # file stays to say that nobody holds them.
    assert _shm_files(dead_prefix + ".lock")
    server = FakeServer()
    server.registered.update({name: MIN_REGION for name in dead})
    living = RegionPool(server.register, server.unregister)  # another front end, alive
    held = living.take(10)
    server.registered["not-ours"] = 1
    starting = RegionPool(server.register, server.unregister)
    mine = starting.take(10)
    freed = starting.reclaim_stale(list(server.registered))
    assert sorted(freed) == sorted(dead)
    assert _shm_files(dead_prefix) == []  # regions and lock file gone
    assert set(server.registered) == {held.name, mine.name, "not-ours"}
    assert starting.reclaim_stale(list(server.registered)) == []  # nothing else is anyone's to free
    for pool, region in ((living, held), (starting, mine)):
        pool.give(region)
        pool.close()
        assert _shm_files(pool._prefix) == []


def test_a_dead_pool_no_server_holds_any_more_leaves_nothing_behind(tmp_path):
    """The server died too (or was restarted): nobody lists the dead pool's regions, but its
    lock file and region files are still in /dev/shm; the next pool removes them."""
    dead = _dead_pool(tmp_path, keep_files=True)
    dead_prefix = dead[0].rsplit("-", 1)[0]
    assert sorted(_shm_files(dead_prefix)) == sorted(dead + [dead_prefix + ".lock"])
    server = FakeServer()
    living = RegionPool(server.register, server.unregister)
    held = living.take(10)
    starting = RegionPool(server.register, server.unregister)
    assert starting.reclaim_stale([]) == []  # nothing was registered anywhere
    assert _shm_files(dead_prefix) == []
    assert sorted(_shm_files(living._prefix)) == sorted([held.name, living._prefix + ".lock"])  # alive: kept
    living.give(held)
    for pool in (living, starting):
        pool.close()
        assert _shm_files(pool._prefix) == []


def test_a_pool_keeps_its_claim_while_a_closed_pool_still_has_a_region_on_the_wire():
    server = FakeServer()
    pool = RegionPool(server.register, server.unregister)
    busy = pool.take(10)
    pool.close()
    other = RegionPool(server.register, server.unregister)
    assert other.reclaim_stale(list(server.registered)) == []  # the request still holds its region
    pool.give(busy)
    assert _shm_files(pool._prefix) == [] and server.registered == {}
    other.close()
