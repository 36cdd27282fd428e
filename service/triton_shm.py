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

A front end that dies (killed, out of memory) cannot free its regions: the server keeps them
registered and mapped, so their memory stays allocated even where multiprocessing's resource
tracker unlinks the files (when the whole container dies, the files stay too). Each pool
therefore holds an exclusive lock on a file of its own beside its regions for as long as any
of them lives; the kernel drops the lock when the process dies, in whatever PID namespace, so
the next front end to start (`reclaim_stale`) can tell the dead pools' regions from the
living ones and free them.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import uuid
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import claims

log = logging.getLogger("atoken.triton")
ALIGN = 64  # each tensor starts on a cache line
MIN_REGION = 1 << 20
SHM_DIR = "/dev/shm"  # where POSIX shared memory lives on Linux (shm_open's "/name")
_REGION_NAME = re.compile(r"(atoken-[0-9a-f]{12})-[0-9]+")
_LOCK_NAME = re.compile(r"atoken-[0-9a-f]{12}\.lock")


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
        self._prefix = f"atoken-{uuid.uuid4().hex[:12]}"
        self._owner = _hold(_lock_path(self._prefix))  # held while any region of ours lives
        self._free: list[Region] = []
        self._lock = threading.Lock()
        self._count = 0
        self._live = 0
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
        self._release_if_done()

    def reclaim_stale(self, registered: list[str]) -> list[str]:
        """Frees what pools that died left behind: the regions among `registered` (the names
        the server holds), unregistered at the server, and every dead pool's files in
        /dev/shm, its lock file included, also where no server holds its regions any more
        (the server was restarted too). A pool still alive, in this process or another, holds
        its lock and is left alone, as is any region not named by a pool like this one.
        -> the registered names freed."""
        owners: dict[str, list[str]] = {}
        for name in registered:
            if match := _REGION_NAME.fullmatch(name):
                owners.setdefault(match.group(1), []).append(name)
        files: dict[str, list[str]] = {}  # pool -> its region files in /dev/shm
        for name in _shm_names():
            if _LOCK_NAME.fullmatch(name):
                owners.setdefault(name.removesuffix(".lock"), [])
            elif match := _REGION_NAME.fullmatch(name):
                files.setdefault(match.group(1), []).append(name)
        owners.pop(self._prefix, None)
        freed = []
        for owner, names in owners.items():
            path = _lock_path(owner)
            dead = claims.abandoned(path)
            if dead is None:
                continue
            for name in names:
                try:
                    self._unregister(name)
                except Exception as exc:  # noqa: BLE001 - still ours to remove from /dev/shm
                    log.warning("could not unregister stale region %s: %s", name, exc)
            for name in files.get(owner, []):
                claims.unlink(os.path.join(SHM_DIR, name))
            claims.unlink(path)
            os.close(dead)
            freed += names
        return freed

    def _create(self, size: int) -> Region:
        with self._lock:
            self._count += 1
            self._live += 1
            name = f"{self._prefix}-{self._count}"
        try:
            handle = self._shm.create_shared_memory_region(name, "/" + name, size, create_only=True)
        except Exception:
            self._forget_one()
            raise
        try:
            self._register(name, "/" + name, size)
        except Exception:
            self._shm.destroy_shared_memory_region(handle)
            self._forget_one()
            raise
        return Region(name, handle, size, handle._mpsm_handle.buf)

    def _destroy(self, region: Region) -> None:
        try:
            self._unregister(region.name)
        except Exception:  # noqa: BLE001 - the server may be gone; the memory is ours to free
            pass
        self._shm.destroy_shared_memory_region(region.handle)
        self._forget_one()

    def _forget_one(self) -> None:
        with self._lock:
            self._live -= 1
        self._release_if_done()

    def _release_if_done(self) -> None:
        """The lock file goes once the pool is closed and its last region freed: a region still
        on the wire keeps its pool's claim, so no starting front end reclaims it mid-request."""
        with self._lock:
            if not self._closed or self._live or self._owner is None:
                return
            owner, self._owner = self._owner, None
        claims.unlink(_lock_path(self._prefix))
        os.close(owner)


def _lock_path(prefix: str) -> str:
    return os.path.join(SHM_DIR, prefix + ".lock")


def _shm_names() -> list[str]:
    try:
        return os.listdir(SHM_DIR)
    except OSError:
        return []


def _hold(path: str) -> int | None:
    """This pool's claim: `path` created and locked. None where that fails (no /dev/shm, no
    permission): the pool then works unclaimed, and nobody reclaims a pool without a lock file."""
    try:
        return claims.create_claimed(path)
    except OSError as exc:
        log.info("no lock file for this front end's shared-memory regions (%s)", exc)
        return None
