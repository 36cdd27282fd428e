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


class MediaOutOfRangeError(MediaError):
    """A declared size that is within the byte limits but outside what the model can take
    (an extreme aspect ratio, too many tokens for one item)."""

    code = "out_of_range"


class UnsupportedMediaError(MediaError):
    """Unknown, disguised or disallowed format."""

    code = "unsupported_media_type"


class CorruptMediaError(MediaError):
    """Truncated, corrupt or semantically invalid content (NaN vertices, zero frames, ...)."""

    code = "invalid_media"


def check_limit(what: str, actual: int | float, limit: int | float, unit: str = "",
                error: type[MediaError] = MediaTooLargeError) -> None:
    if actual > limit:
        suffix = f" {unit}" if unit else ""
        raise error(f"{what} is {_num(actual)}{suffix}, over the limit of {_num(limit)}{suffix}",
                    limit=limit, actual=actual)


def _num(value: int | float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"
