"""One input read and decoded for the model, as numpy arrays (no torch: a Ray pre-processing
task imports only this). Bad inputs become `Failed`, the error the HTTP API would answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from ..errors import PayloadTooLarge, error_body
from ..inputs import Options, Pixels, VideoSource, Voxels, decode
from ..media import video as vid
from ..media.limits import MediaLimits
from .sources import Entry


@dataclass
class Prepared:
    key: str
    modality: str
    kind: str
    media: dict
    # (frames, job input): one, or a video's `VideoTiles` (its tiles' list where a Ray task
    # decoded it); the local engine replaces an image's or asset's arrays by the SparseBatch
    # built from them (`pipeline.built`)
    sources: Iterable[tuple[int, Pixels | Voxels]]
    video: bool = False


@dataclass
class VideoTiles:
    """A video's job inputs, decoded a 16-frame tile at a time as the model reaches them: its
    frames never all exist at once (up to 36,000 frames are allowed). It pickles as the file's
    bytes and the plan read from its header, so a Ray pre-processing task can hand the actor
    the compressed video instead of its frames (beyond `on_ray.PREPARE_BYTES`)."""
    source: VideoSource

    def __iter__(self):
        return ((len(frames), Pixels(vid.pad_to_tubelets(frames))) for frames in self.source.tiles())

    @property
    def held_bytes(self) -> int:
        """What it holds until it runs: the file's bytes (none when it is read from a path)."""
        return len(self.source.data) if isinstance(self.source.data, bytes) else 0

    @property
    def decoded_bytes(self) -> int:
        """At most what its tiles weigh decoded (uint8 frames at the model size, every tile
        counted whole), from the plan read from the header: known before a frame is decoded."""
        plan = self.source.plan
        h, w = plan.resize.model
        return plan.tiles * vid.TILE * h * w * 3


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


def prepare(entry: Entry, options: Options, limits: MediaLimits) -> Prepared | Failed:
    """Read and decode one input (a worker thread's or a Ray task's job); a video is planned
    from its header here and decoded as it runs."""
    try:
        if entry.size > limits.max_bytes:
            raise PayloadTooLarge(f"file {entry.key!r} exceeds {limits.max_bytes} bytes", limit=limits.max_bytes)
        d = decode(entry.read(), options, limits)
        if d.stream is None:
            return Prepared(entry.key, d.modality, d.kind, d.media, [(1, d.input)])
        return Prepared(entry.key, d.modality, d.kind, dict(d.media), VideoTiles(d.stream), video=True)
    except Exception as exc:  # noqa: BLE001 - a bad input is one line in errors.jsonl
        return failure(entry.key, exc)
