"""Move an MP4's `moov` index in front of `mdat`, in memory ("fast start").

Browsers can then start playing before the whole file arrives. FFmpeg's own faststart
re-opens the output file by name, which an in-memory buffer cannot offer; this does the same
relocation on bytes: reorder top-level boxes and shift every chunk offset (stco/co64).
"""

from __future__ import annotations

import struct

CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"dinf", b"udta", b"mvex"}


def _boxes(data: bytes | bytearray, start: int, end: int):
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        header = 8
        if size == 1:
            size = struct.unpack(">Q", data[pos + 8:pos + 16])[0]
            header = 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            raise ValueError(f"malformed MP4 box {kind!r} at {pos}")
        yield kind, pos, header, size
        pos += size


def _shift_offsets(moov: bytearray, start: int, end: int, delta: int) -> None:
    for kind, pos, header, size in _boxes(moov, start, end):
        body = pos + header
        if kind in CONTAINERS:
            _shift_offsets(moov, body, pos + size, delta)
        elif kind == b"stco":
            (count,) = struct.unpack(">I", moov[body + 4:body + 8])
            for i in range(count):
                at = body + 8 + 4 * i
                (value,) = struct.unpack(">I", moov[at:at + 4])
                if value + delta >= 2**32:
                    raise ValueError("chunk offset overflows 32 bits; co64 upgrade not supported")
                moov[at:at + 4] = struct.pack(">I", value + delta)
        elif kind == b"co64":
            (count,) = struct.unpack(">I", moov[body + 4:body + 8])
            for i in range(count):
                at = body + 8 + 8 * i
                (value,) = struct.unpack(">Q", moov[at:at + 8])
                moov[at:at + 8] = struct.pack(">Q", value + delta)


def faststart(data: bytes) -> bytes:
    """Return the file with `moov` before `mdat` (unchanged if it already is)."""
    top = list(_boxes(data, 0, len(data)))
    kinds = [k for k, *_ in top]
    if b"moov" not in kinds or b"mdat" not in kinds or kinds.index(b"moov") < kinds.index(b"mdat"):
        return data
    moov_entry = top[kinds.index(b"moov")]
    _, mpos, mheader, msize = moov_entry
    moov = bytearray(data[mpos:mpos + msize])
    _shift_offsets(moov, mheader, msize, msize)
    out = bytearray()
    first_media = kinds.index(b"mdat")
    for i, (kind, pos, _, size) in enumerate(top):
        if i == first_media:
            out += moov
        if kind != b"moov":
            out += data[pos:pos + size]
    return bytes(out)
