"""The shared-memory regions that carry Triton request inputs: reuse, growth, cleanup."""

import os
import threading

import numpy as np
import pytest

pytest.importorskip("tritonclient")

from service.triton_shm import ALIGN, MIN_REGION, RegionPool, region_bytes  # noqa: E402


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


def _shm_files(prefix: str) -> list[str]:
    return [f for f in os.listdir("/dev/shm") if f.startswith(prefix)]


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
    assert len(_shm_files(prefix)) == 2
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
    assert _shm_files(pool._prefix) == []
    pool.close()
