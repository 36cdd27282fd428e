"""Limits checked before anything large is decoded. The service fills these from settings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MediaLimits:
    max_bytes: int = 64 * 2**20
    max_pixels: int = 4096 * 4096  # per image or video frame, read from the header
    max_side: int = 1024  # images/frames are resized so the longer side is at most this
    min_side: int = 16
    max_frames: int = 36_000  # video frames after sampling, streamed through in 16-frame tiles
    max_duration_s: float = 600.0
    max_vertices: int = 2_000_000
    max_faces: int = 4_000_000
    max_voxels: int = 64**3
    max_tokens: int = 32768  # model tokens per item, computed from declared sizes before decoding
    max_aspect: float = 32.0  # longer side / shorter side of an image or frame
    max_inflated_bytes: int = 64 * 2**20  # what an archive (zip mesh, npz volume) may inflate to
    # A video's decoding work in source pixels (`video.decoding_work`), and a /decode video's
    # output canvas: about 100-170 s of decoding on one core here (docs/media.md)
    max_video_pixels: int = 10**10
