"""Every error the service answers with, and the one table that maps error types to HTTP
status codes. Bodies are JSON: {"error": {"code", "message", "limit"?}}."""

from __future__ import annotations

from typing import Any

from starlette.requests import ClientDisconnect

from model.errors import (ATokenError, CheckpointError, ConfigError, InvalidInputError, TokenLimitError,
                          UnsupportedError)

from .media.errors import CorruptMediaError, MediaError, MediaTooLargeError, UnsupportedMediaError


class ServiceError(Exception):
    code = "error"
    headers: dict[str, str] = {}

    def __init__(self, message: str, *, limit: Any = None, retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        self.limit = limit
        self.retry_after = retry_after


class BadRequest(ServiceError):
    code = "bad_request"


class Unauthorized(ServiceError):
    code = "unauthorized"
    headers = {"WWW-Authenticate": 'Bearer realm="atoken"'}


class RequestTimeout(ServiceError):
    """The client did not send its body in time; the connection is closed after the answer."""

    code = "request_timeout"
    headers = {"Connection": "close"}


class PayloadTooLarge(ServiceError):
    code = "too_large"


class UnsupportedType(ServiceError):
    code = "unsupported_media_type"


class InvalidParameter(ServiceError):
    code = "invalid_parameter"


class ModelNotFound(ServiceError):
    code = "model_not_found"


class NotAcceptable(ServiceError):
    code = "not_acceptable"


class Overloaded(ServiceError):
    code = "overloaded"


class NotReady(ServiceError):
    code = "not_ready"


class WorkerUnavailable(ServiceError):
    code = "worker_unavailable"


class DeadlineExceeded(ServiceError):
    code = "deadline_exceeded"


class JobNotFound(ServiceError):
    code = "job_not_found"


class JobNotFinished(ServiceError):
    """409: a job's result was asked for before the job finished."""

    code = "job_not_finished"


class JobGone(ServiceError):
    """410: the job's result expired or the job was cancelled."""

    code = "job_gone"


class StorageFull(ServiceError):
    """507: the jobs directory's cap is reached; live results are never deleted to make room."""

    code = "insufficient_storage"


class NonFiniteOutput(ServiceError):
    """500: the model's output holds NaN or infinities, which a JSON answer cannot carry."""

    code = "non_finite_output"


class ClientClosedRequest(ServiceError):
    """Nobody is listening any more; logged and counted as 499, as nginx does."""

    code = "client_closed_request"


# The one table: most specific classes first.
STATUS: list[tuple[type[Exception], int, str | None]] = [
    (BadRequest, 400, None),
    (Unauthorized, 401, None),
    (RequestTimeout, 408, None),
    (ModelNotFound, 404, None),
    (JobNotFound, 404, None),
    (JobNotFinished, 409, None),
    (JobGone, 410, None),
    (StorageFull, 507, None),
    (NotAcceptable, 406, None),
    (PayloadTooLarge, 413, None),
    (MediaTooLargeError, 413, None),
    (TokenLimitError, 413, "too_many_tokens"),
    (UnsupportedType, 415, None),
    (UnsupportedMediaError, 415, None),
    (InvalidParameter, 422, None),
    (CorruptMediaError, 422, None),
    (MediaError, 422, None),
    (UnsupportedError, 422, "unsupported_by_model"),
    (InvalidInputError, 422, "invalid_input"),
    (CheckpointError, 500, "checkpoint_error"),
    (NonFiniteOutput, 500, None),
    (ConfigError, 500, "config_error"),
    (ATokenError, 422, "model_error"),
    (Overloaded, 429, None),
    (NotReady, 503, None),
    (WorkerUnavailable, 503, None),
    (DeadlineExceeded, 504, None),
    (ClientClosedRequest, 499, None),
    # Starlette's, raised where a body is read (uploads, JSON, forms) and the client has gone:
    # a client's doing, not a bug to log with its traceback and count as a 500.
    (ClientDisconnect, 499, "client_closed_request"),
]

MODEL_ERRORS = {cls.__name__: cls for cls in (InvalidInputError, TokenLimitError, UnsupportedError, ATokenError)}


def status_for(exc: Exception) -> tuple[int, str]:
    for cls, status, code in STATUS:
        if isinstance(exc, cls):
            return status, code or getattr(exc, "code", "error")
    return 500, "internal_error"


def error_body(exc: Exception) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) for any exception."""
    status, code = status_for(exc)
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    if status == 500 and code == "internal_error":
        message = "internal error"
    body: dict[str, Any] = {"code": code, "message": message}
    limit = getattr(exc, "limit", None)
    if limit is not None:
        body["limit"] = limit
    headers = dict(getattr(exc, "headers", None) or {})
    retry = getattr(exc, "retry_after", None)
    if retry is not None:
        headers["Retry-After"] = str(int(retry))
    return status, {"error": body}, headers


def from_worker(name: str, message: str) -> Exception:
    """Rebuild a typed error reported by the worker (which may live in another process)."""
    cls = MODEL_ERRORS.get(name)
    if cls is TokenLimitError:
        return InvalidParameter(message)
    return cls(message) if cls else RuntimeError(f"{name}: {message}")


OPENAI_TYPES = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}


def openai_shape(status: int, body: dict) -> dict:
    """Our error body in the shape OpenAI clients parse: {"error": {"message", "type", "param", "code"}}."""
    error = body["error"]
    kind = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": error["message"], "type": kind, "param": None, "code": error["code"]}}


def openai_error(exc: Exception) -> tuple[int, dict, dict]:
    status, body, headers = error_body(exc)
    return status, openai_shape(status, body), headers
