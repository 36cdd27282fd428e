"""Typed errors raised by the model package.

The service maps each class to an HTTP status in one table; callers in Python can catch the
base class. Messages name the offending value and the limit, never just "assertion failed".
"""


class ATokenError(Exception):
    """Base class of every error the model package raises on purpose."""


class InvalidInputError(ATokenError, ValueError):
    """A tensor argument has the wrong shape, dtype, range or is empty."""


class TokenLimitError(InvalidInputError):
    """A batch or item holds more tokens than the configured maximum."""

    def __init__(self, message: str, *, limit: int, actual: int):
        super().__init__(message)
        self.limit = limit
        self.actual = actual


class UnsupportedError(ATokenError):
    """The loaded model cannot do what was asked (e.g. discrete tokens without a quantizer)."""


class CheckpointError(ATokenError):
    """A checkpoint does not match the config: missing/unexpected keys or wrong shapes."""


class ConfigError(ATokenError, ValueError):
    """A config file or variant name is malformed or unknown."""
