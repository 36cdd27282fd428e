"""Large uploads stay on disk. A file over SPILL_BYTES is copied from the request's spooled
temporary file (or the raw body) into a file of its own, chunk by chunk; videos are then read
from that file by the decoder and never held in memory, so a long clip costs disk, not RAM.
Smaller inputs, and every non-video, are plain bytes as before."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import AsyncIterator, BinaryIO

from .errors import PayloadTooLarge

SPILL_BYTES = 1 << 20  # as Starlette's own spooling: beyond this, an upload is a file
CHUNK = 1 << 20
VIDEO_MAGIC = (b"ftyp", b"\x1aE\xdf\xa3", b"AVI ")


@dataclass
class DiskUpload:
    path: str
    size: int
    owned: bool = True  # close() deletes the file (inputs of stored jobs are owned by the store)

    def head(self, n: int = 65536) -> bytes:
        with open(self.path, "rb") as f:
            return f.read(n)

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    def looks_like_video(self) -> bool:
        head = self.head(64)
        return head[4:8] == VIDEO_MAGIC[0] or head[:4] == VIDEO_MAGIC[1] or head[8:12] == VIDEO_MAGIC[2]

    def close(self) -> None:
        if self.owned and os.path.exists(self.path):
            os.unlink(self.path)

    def __len__(self) -> int:
        return self.size


Upload = bytes | DiskUpload


class _SpillFile:
    """A new file written block by block, refused (and removed) past `limit` bytes."""

    def __init__(self, limit: int, refusal: str):
        self.limit, self.refusal, self.size = limit, refusal, 0
        handle, self.path = tempfile.mkstemp(prefix="atoken-upload-")
        self.out = os.fdopen(handle, "wb")

    def write(self, block: bytes) -> None:
        self.size += len(block)
        if self.size > self.limit:
            raise PayloadTooLarge(self.refusal, limit=self.limit)
        self.out.write(block)

    def __enter__(self) -> "_SpillFile":
        return self

    def __exit__(self, failed, *_) -> None:
        self.out.close()
        if failed:
            os.unlink(self.path)

    def upload(self) -> DiskUpload:
        return DiskUpload(self.path, self.size)


def spill(source: BinaryIO, limit: int, name: str = "upload") -> DiskUpload:
    """A file-like object (a spooled upload) -> its own file on disk, refused past `limit`."""
    source.seek(0)
    with _SpillFile(limit, f"file {name!r} exceeds {limit} bytes") as f:
        while block := source.read(CHUNK):
            f.write(block)
    return f.upload()


async def spill_stream(chunks: AsyncIterator[bytes], limit: int) -> DiskUpload:
    """A request body, as it arrives -> a file on disk (writes are small and sequential)."""
    with _SpillFile(limit, f"request body exceeds {limit} bytes for one uploaded file") as f:
        async for block in chunks:
            f.write(block)
    return f.upload()


def release(uploads: list) -> None:
    for upload in uploads:
        if isinstance(upload, DiskUpload):
            upload.close()
