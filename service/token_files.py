"""/tokenize answers written to a file piece by piece, so a long video's tokens never sit in
memory: each tile's coords and values are appended to raw spool files, and the answer (JSON,
safetensors or .npy) is assembled from them in fixed-size chunks at the end."""

from __future__ import annotations

import base64
import json
import os
import struct
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

import numpy as np

from .arrays import finite_list
from .responses import render_json
from .streaming import temp_path

CHUNK_ROWS = 4096
ST_DTYPES = {"float32": "F32", "float16": "F16", "int32": "I32", "int64": "I64", "uint16": "U16", "uint8": "U8",
             "int16": "I16"}


@dataclass
class Spool:
    """Rows of one array appended to a raw little-endian file: [rows, width] of `dtype`."""

    dtype: np.dtype
    width: int
    path: str = field(default_factory=lambda: temp_path(".bin"))
    rows: int = 0

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype.newbyteorder("<"))
        with open(self.path, "ab") as f:
            f.write(rows.tobytes())
        self.rows += rows.shape[0]

    def chunks(self) -> Iterator[np.ndarray]:
        row_bytes = self.width * self.dtype.itemsize
        with open(self.path, "rb") as f:
            while block := f.read(CHUNK_ROWS * row_bytes):
                yield np.frombuffer(block, self.dtype.newbyteorder("<")).reshape(-1, self.width).astype(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.rows * self.width * self.dtype.itemsize

    def remove(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)


@dataclass
class StreamedTokens:
    """One streamed item: its coords [n, 4] int32 and latents or indices, plus its JSON fields."""

    coords: Spool
    values: Spool
    field: str  # "latents" or "indices"
    entry: dict  # index, modality, kind, media, num_tokens (filled at the end)

    def remove(self) -> None:
        self.coords.remove()
        self.values.remove()


def _b64_stream(out: BinaryIO, chunks: Iterator[np.ndarray]) -> None:
    """Base64 of the concatenated chunks, written as it goes (3-byte groups carried over)."""
    carry = b""
    for chunk in chunks:
        data = carry + chunk.tobytes()
        cut = len(data) - len(data) % 3
        out.write(base64.b64encode(data[:cut]))
        carry = data[cut:]
    out.write(base64.b64encode(carry))


def _list_stream(out: BinaryIO, chunks: Iterator[np.ndarray], name: str) -> None:
    """Nested lists of the concatenated chunks, one chunk's rows rendered at a time (checked
    finite like every float list an answer carries: `arrays.finite_list`)."""
    out.write(b"[")
    first = True
    for chunk in chunks:
        if len(chunk):
            out.write((b"" if first else b",") + render_json(finite_list(chunk, name))[1:-1])
            first = False
    out.write(b"]")


def _json_array(out: BinaryIO, spool: Spool, fmt: str, name: str) -> None:
    out.write(b'{"dtype": "%s", "shape": [%d, %d], "data": ' % (str(spool.dtype).encode(), spool.rows, spool.width))
    if fmt == "list":
        _list_stream(out, spool.chunks(), name)
    else:
        out.write(b'"')
        _b64_stream(out, spool.chunks())
        out.write(b'"')
    out.write(b"}")


def write_json(path: str, head: dict, items: list[dict | StreamedTokens], fmt: str) -> None:
    """{"model", "mode", "items": [...]}: in-memory entries dumped, streamed ones assembled."""
    with open(path, "wb") as out:
        out.write(render_json(head)[:-1] + b', "items": [')
        for i, item in enumerate(items):
            out.write(b", " if i else b"")
            if isinstance(item, dict):
                out.write(render_json(item))
                continue
            out.write(render_json(item.entry)[:-1] + b', "coords": ')
            _json_array(out, item.coords, fmt, "the coords")
            out.write(b', "%s": ' % item.field.encode())
            _json_array(out, item.values, fmt, f"the {item.field}")
            out.write(b"}")
        out.write(b"]}")


def write_safetensors(path: str, arrays: list[tuple[str, np.ndarray | Spool]], meta: dict) -> None:
    """The safetensors layout (8-byte header size, JSON header, raw data) written from arrays
    and spools alike; data offsets follow the given order."""
    header, offset = {"__metadata__": {"json": json.dumps(meta)}}, 0
    for name, source in arrays:
        dtype = source.dtype if isinstance(source, Spool) else source.dtype
        shape = [source.rows, source.width] if isinstance(source, Spool) else list(source.shape)
        size = source.nbytes if isinstance(source, Spool) else np.ascontiguousarray(source).nbytes
        header[name] = {"dtype": ST_DTYPES[str(dtype)], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)) + blob)
        for _, source in arrays:
            chunks = source.chunks() if isinstance(source, Spool) else [np.ascontiguousarray(source)]
            for chunk in chunks:
                out.write(chunk.astype(chunk.dtype.newbyteorder("<"), copy=False).tobytes())


def write_npy_table(path: str, item: StreamedTokens) -> None:
    """One item as a [n, 4 + width] table (coords then values): float32, or int32 for indices."""
    dtype = np.dtype(np.int32 if item.field == "indices" else np.float32)
    shape = (item.coords.rows, 4 + item.values.width)
    header = "{'descr': '%s', 'fortran_order': False, 'shape': (%d, %d), }" % (dtype.str, *shape)
    header += " " * (-(len(header) + 11) % 64) + "\n"
    with open(path, "wb") as out:
        out.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin-1"))
        for coords, values in zip(item.coords.chunks(), item.values.chunks()):
            out.write(np.concatenate([coords.astype(dtype), values.astype(dtype)], 1).tobytes())
