"""Typed media errors. The HTTP layer maps each class to a status code in one table."""

from __future__ import annotations


class MediaError(Exception):
    code = "invalid_media"

    def __init__(self, message: str, *, limit: int | float | None = None, actual: int | float | None = None):
        super().__init__(message)
        self.message = message
        self.limit = limit
        self.actual = actual


class MediaTooLargeError(MediaError):
    """Bytes, pixels, frames, duration or vertices over a configured limit."""

    code = "too_large"


class UnsupportedMediaError(MediaError):
    """Unknown, disguised or disallowed format."""

    code = "unsupported_media_type"


class CorruptMediaError(MediaError):
    """Truncated, corrupt or semantically invalid content (NaN vertices, zero frames, ...)."""

    code = "invalid_media"


def check_limit(what: str, actual: int | float, limit: int | float, unit: str = "") -> None:
    if actual > limit:
        suffix = f" {unit}" if unit else ""
        raise MediaTooLargeError(f"{what} is {actual:g}{suffix}, over the limit of {limit:g}{suffix}",
                                 limit=limit, actual=actual)
