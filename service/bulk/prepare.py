"""One input read and decoded for the model, as numpy arrays (no torch: a Ray pre-processing
task imports only this). Bad inputs become `Failed`, the error the HTTP API would answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from ..errors import PayloadTooLarge, error_body
from ..inputs import Options, Pixels, Voxels, decode
from ..media import video as vid
from ..media.limits import MediaLimits
from .sources import Entry


@dataclass
class Prepared:
    key: str
    modality: str
    kind: str
    media: dict
    # (frames, job input): one, or a video's tiles (lazy locally); the local engine replaces an
    # image's or asset's arrays by the SparseBatch built from them (`pipeline.built`)
    sources: Iterable[tuple[int, Pixels | Voxels]]
    video: bool = False


@dataclass
class Failed:
    key: str
    status: int
    code: str
    message: str

    def record(self) -> dict:
        return {"key": self.key, "status": self.status, "code": self.code, "message": self.message}


def failure(key: str, exc: BaseException) -> Failed:
    """The error the HTTP API would have answered for this input."""
    status, body, _ = error_body(exc) if isinstance(exc, Exception) else (500, {"error": {
        "code": "internal_error", "message": str(exc)}}, {})
    return Failed(key, status, body["error"]["code"], body["error"]["message"])


def prepare(entry: Entry, options: Options, limits: MediaLimits, lazy: bool = True) -> Prepared | Failed:
    """Read and decode one input (a worker thread's or a Ray task's job)."""
    try:
        if entry.size > limits.max_bytes:
            raise PayloadTooLarge(f"file {entry.key!r} exceeds {limits.max_bytes} bytes", limit=limits.max_bytes)
        d = decode(entry.read(), options, limits)
        if d.stream is None:
            return Prepared(entry.key, d.modality, d.kind, d.media, [(1, d.input)])
        tiles = ((len(frames), Pixels(vid.pad_to_tubelets(frames))) for frames in d.stream.tiles())
        return Prepared(entry.key, d.modality, d.kind, dict(d.media), tiles if lazy else list(tiles), video=True)
    except Exception as exc:  # noqa: BLE001 - a bad input is one line in errors.jsonl
        return failure(entry.key, exc)
