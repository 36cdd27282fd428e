"""Request inputs through system shared memory, for a Triton server on the same host.

On the wire, tritonclient copies a batch's pixels four times before the kernel sees them
(`tobytes`, joining the JSON header and the tensors, joining the HTTP head and body, the send),
each into fresh memory that must be page-faulted in: about 0.8 ms of the front end's CPU per
256x256 image, against 0.05 ms to write the same bytes once into pages already mapped. So each
request's inputs are written into a registered region and only their names and offsets travel
(Triton's system shared-memory extension); the server reads them where they lie. Outputs still
come back on the wire: their sizes are not known in advance, and an /encode answer is small.

Regions are reused: one per request in flight, checked out for the call and given back after
it, grown (re-created, re-registered) when a request needs more than its region holds. A
request is at most one batch, so the regions together hold at most (requests in flight) x
(largest batch's bytes).
"""

from __future__ import annotations

import os
import threading
import uuid
from dataclasses import dataclass
from typing import Callable

import numpy as np

ALIGN = 64  # each tensor starts on a cache line
MIN_REGION = 1 << 20


@dataclass
class Region:
    name: str  # the name Triton knows it by (also the /dev/shm key)
    handle: object  # tritonclient's SharedMemoryRegion
    size: int
    view: memoryview

    def write(self, arrays: dict[str, np.ndarray]) -> dict[str, tuple[int, int]]:
        """Copy the arrays in, one after another; -> {name: (offset, byte size)}."""
        placed, offset = {}, 0
        for name, value in arrays.items():
            value = np.ascontiguousarray(value)
            np.ndarray(value.shape, value.dtype, buffer=self.view, offset=offset)[...] = value
            placed[name] = (offset, value.nbytes)
            offset += _aligned(value.nbytes)
        return placed


def region_bytes(arrays: dict[str, np.ndarray]) -> int:
    return sum(_aligned(a.nbytes) for a in arrays.values())


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


class RegionPool:
    """Regions for requests in flight. `register(name, key, size)` and `unregister(name)` tell
    the server (through a client); creating and destroying the memory happens here."""

    def __init__(self, register: Callable[[str, str, int], None], unregister: Callable[[str], None]):
        from tritonclient.utils import shared_memory as shm

        self._shm = shm
        self._register, self._unregister = register, unregister
        self._prefix = f"atoken-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._free: list[Region] = []
        self._lock = threading.Lock()
        self._count = 0
        self._closed = False

    def take(self, nbytes: int) -> Region:
        """A region of at least nbytes that no other request holds until `give`."""
        with self._lock:
            fits = [r for r in self._free if r.size >= nbytes]
            if fits:
                region = min(fits, key=lambda r: r.size)
                self._free.remove(region)
                return region
            small = self._free.pop() if self._free else None
        if small is not None:  # replaced by one that fits: the count stays at the requests in flight
            self._destroy(small)
        return self._create(max(MIN_REGION, 1 << (nbytes - 1).bit_length()))

    def give(self, region: Region) -> None:
        with self._lock:
            if not self._closed:
                self._free.append(region)
                return
        self._destroy(region)  # the pool closed while a request held it

    def close(self) -> None:
        """Frees the regions no request holds now; one still held is freed when given back
        (a batch on the wire while the backend stops must not lose its memory mid-write)."""
        with self._lock:
            self._closed = True
            free, self._free = self._free, []
        for r in free:
            self._destroy(r)

    def _create(self, size: int) -> Region:
        with self._lock:
            self._count += 1
            name = f"{self._prefix}-{self._count}"
        handle = self._shm.create_shared_memory_region(name, "/" + name, size, create_only=True)
        try:
            self._register(name, "/" + name, size)
        except Exception:
            self._shm.destroy_shared_memory_region(handle)
            raise
        return Region(name, handle, size, handle._mpsm_handle.buf)

    def _destroy(self, region: Region) -> None:
        try:
            self._unregister(region.name)
        except Exception:  # noqa: BLE001 - the server may be gone; the memory is ours to free
            pass
        self._shm.destroy_shared_memory_region(region.handle)
