"""What crosses the pipe to the model worker: a small pickle of the message's structure, with
its arrays in a shared-memory arena when they fit.

torch's default for multiprocessing moves each tensor through its own shared-memory segment,
whose file descriptor the receiver fetches over a socket from a helper thread of the sender.
That thread needs the front end's GIL, so a busy event loop (say, answering a flood of 429s)
stalls the worker's every batch. Here each batch slot has an arena each way, mapped by both
processes when the worker starts and reused for every message of that slot (one batch is in a
slot at a time): the sender copies each array in once, the receiver copies it out once, and the
pipe carries only offsets. A message too large for its arena travels whole through the pipe
instead, so nothing is ever refused for size here (the request limits bound it upstream)."""

from __future__ import annotations

import io
import mmap
import os
import pickle
import re
import tempfile
import uuid

import torch

from .. import claims

ALIGN = 64  # array starts on cache-line boundaries
# Per direction, shared out among the batches in flight. A CPU batch of 2048 tokens crosses in
# 1.5 MB (images as uint8 patches or pixels) to 6 MB (video); larger messages (a large 3D
# asset's reconstructed voxel features, 3 KB a voxel) travel through the pipe. 32 MiB in all
# fits a container's default /dev/shm.
ARENA_BYTES = 16 * 2**20
_IN_ARENA, _INLINE = b"A", b"I"
_NAME = re.compile(r"atoken-[0-9]+-[0-9a-f]{12}")


def _tensor(array, dtype: str) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    return tensor.view(getattr(torch, dtype)) if dtype == "bfloat16" else tensor


class _ByValue(pickle.Pickler):
    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            if t.dtype == torch.bfloat16:  # numpy has no bfloat16: travel as raw 16-bit words
                return _tensor, (t.view(torch.int16).numpy(), "bfloat16")
            return _tensor, (t.numpy(), str(t.dtype).removeprefix("torch."))
        return NotImplemented


class ArenaUnavailable(OSError):
    """No room for an arena where shared memory lives (a container's /dev/shm is 64 MiB by default)."""


class Arena:
    """A fixed-size shared file mapped by both processes. The creator unlinks its name once the
    other side has mapped it (`forget_name`), so nothing is left behind by a crash after that.

    A front end killed before (the worker takes seconds to load the model) cannot unlink it, and
    shared memory is RAM: a pod whose container restarts keeps its /dev/shm, and each such
    crash would keep another set. So the creator holds an exclusive lock on the file while its
    name exists; the kernel drops the lock when the process dies, in whatever PID namespace,
    and the next front end to make arenas (`reclaim_stale`) unlinks the unlocked ones.

    The creator reserves the file's memory at once: writing through a mapping into a tmpfs
    that has run full is SIGBUS, which would kill the front end mid-request; a reservation
    that does not fit fails here, at start-up, as ArenaUnavailable."""

    def __init__(self, path: str | None = None, size: int = ARENA_BYTES):
        self._claim: int | None = None  # the creator's locked descriptor, while the name exists
        if path is None:
            path = os.path.join(_folder(), f"atoken-{os.getpid()}-{uuid.uuid4().hex[:12]}")
            fd = self._claim = _create_claimed(path, size)
        else:
            fd = os.open(path, os.O_RDWR)
        try:
            self.size = os.fstat(fd).st_size
            self.map = mmap.mmap(fd, self.size)
        finally:
            if fd != self._claim:
                os.close(fd)
        self.path: str | None = path

    def forget_name(self) -> None:
        if self.path and os.path.exists(self.path):
            os.unlink(self.path)
        self.path = None
        if self._claim is not None:
            os.close(self._claim)
            self._claim = None

    def write(self, buffers: list[memoryview]) -> list[tuple[int, int]] | None:
        """Copy the buffers in; their (offset, length), or None when they do not fit."""
        spans, offset = [], 0
        for b in buffers:
            spans.append((offset, b.nbytes))
            offset += -(-b.nbytes // ALIGN) * ALIGN
        if offset > self.size:
            return None
        view = memoryview(self.map)
        try:
            for (start, n), b in zip(spans, buffers):
                view[start:start + n] = b.cast("B")
        finally:
            view.release()
        return spans

    def read(self, spans: list[tuple[int, int]]) -> list[bytearray]:
        """Copies out: the arena is overwritten by the next message."""
        view = memoryview(self.map)
        try:
            return [bytearray(view[start:start + n]) for start, n in spans]
        finally:
            view.release()

    def close(self) -> None:
        self.forget_name()
        self.map.close()


def _folder() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def _create_claimed(path: str, size: int) -> int:
    """The file at `path`, its memory reserved and locked by the returned descriptor."""
    return claims.create_claimed(path, lambda fd, staging: _reserve(fd, staging, size))


def reclaim_stale(folder: str | None = None) -> list[str]:
    """Unlinks the arenas whose creators died before unlinking them (nobody holds their lock);
    -> their names. A living creator's, in this process or another, is left alone."""
    folder = folder or _folder()
    freed = []
    for name in os.listdir(folder):
        if not _NAME.fullmatch(name):
            continue
        path = os.path.join(folder, name)
        fd = claims.abandoned(path)
        if fd is None:  # alive, gone meanwhile, or not ours to open
            continue
        claims.unlink(path)
        os.close(fd)
        freed.append(name)
    return freed


def _reserve(fd: int, path: str, size: int) -> None:
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
        else:  # macOS: a file in the temporary folder, on disk
            os.ftruncate(fd, size)
    except OSError as exc:
        folder = os.path.dirname(path)
        raise ArenaUnavailable(exc.errno, f"no room for a {size / 2**20:.0f} MiB arena in {folder}: {exc.strerror}") from None


def dumps(obj, arena: Arena | None = None) -> bytes:
    buffers: list[pickle.PickleBuffer] = []
    buf = io.BytesIO()
    _ByValue(buf, protocol=5, buffer_callback=buffers.append).dump(obj)
    raws = [b.raw() for b in buffers]
    spans = arena.write(raws) if arena is not None else None
    if spans is not None:
        return _IN_ARENA + pickle.dumps((buf.getvalue(), spans), protocol=5)
    return _INLINE + pickle.dumps((buf.getvalue(), buffers), protocol=5)  # buffers in-band


def loads(data: bytes, arena: Arena | None = None):
    tag, (structure, parts) = data[:1], pickle.loads(memoryview(data)[1:])
    if tag == _IN_ARENA:
        if arena is None:
            raise ValueError("message refers to a shared-memory arena this side does not have")
        buffers = arena.read(parts)
    else:
        buffers = [bytearray(p) for p in parts]  # writable: tensors are built on them
    return pickle.loads(structure, buffers=buffers)
