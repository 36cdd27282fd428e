"""Zip archives (OBJ+MTL meshes, rendered views, npz volumes) opened under an inflation budget."""

from __future__ import annotations

import io
import zipfile

from .errors import CorruptMediaError, check_limit
from .limits import MediaLimits

MAX_ARCHIVE_ENTRIES = 4096


def open_archive(data: bytes, limits: MediaLimits) -> zipfile.ZipFile:
    """A zip whose members may inflate to at most `max_inflated_bytes` in all. The sizes come
    from the central directory, and zipfile never inflates a member past its declared size (a
    lying entry fails its CRC instead), so the budget holds before anything is inflated."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CorruptMediaError(f"corrupt zip archive: {exc}") from None
    check_limit("archive entries", len(members), MAX_ARCHIVE_ENTRIES)
    check_limit("archive inflated size", sum(m.file_size for m in members), limits.max_inflated_bytes, "bytes")
    return archive
