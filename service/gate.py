"""The outermost ASGI layer. Everything that can be decided from the request line and headers
is decided here, before a byte of the body is read: API key (401), declared size (413),
admission (429/503). The body is then read under a byte limit and deadlines (413/408), the
whole request under a hard deadline (504), and every response, 500s included, is counted.

A refused body is never read into memory; the server discards what the client still sends,
so the client can read the answer and the connection stays usable.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time

from fastapi.responses import JSONResponse

from .errors import (DeadlineExceeded, PayloadTooLarge, RequestTimeout, ServiceError, Unauthorized, error_body,
                     openai_shape)
from .runtime import Runtime

log = logging.getLogger("atoken.gate")

JOB_SUBMIT = frozenset({"/jobs/encode", "/jobs/tokenize", "/jobs/reconstruct"})
INFERENCE = frozenset({"/encode", "/tokenize", "/decode", "/reconstruct", "/v1/embeddings"}) | JOB_SUBMIT
PROTECTED = INFERENCE | {"/info", "/v1/models"}
JOBS_PREFIX = "/jobs/"  # every job route needs the key: jobs belong to it
OPENAI_PREFIX = "/v1/"  # errors there come in the OpenAI shape
JSON_TYPES = ("application/json",)
DISCARD_BYTES = 1 << 20  # a refused body up to this size is read and dropped, see _discard_small_body
DISCARD_SECONDS = 2.0


def supplied_key(headers: dict[bytes, bytes]) -> str:
    """The key a request carries: X-API-Key, else Authorization: Bearer."""
    supplied = headers.get(b"x-api-key", b"").decode("latin-1").strip()
    auth = headers.get(b"authorization", b"").decode("latin-1")
    if not supplied and auth.lower().startswith("bearer "):
        supplied = auth[7:].strip()
    return supplied


def check_api_key(headers: dict[bytes, bytes], keys: tuple[str, ...]) -> None:
    if not keys:
        return
    supplied = supplied_key(headers)
    if not supplied:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key'")
    # Compare against every key (constant time each), so timing reveals neither key nor position.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(supplied.encode(), key.encode())
    if not matched:
        raise Unauthorized("wrong API key")


class BodyReader:
    """`receive` with a byte limit, a deadline for the whole body and one between chunks."""

    def __init__(self, receive, max_bytes: int, total_s: float, idle_s: float):
        self.receive = receive
        self.max_bytes = max_bytes
        self.deadline = time.monotonic() + total_s
        self.total_s = total_s
        self.idle_s = idle_s
        self.size = 0
        self.done = False

    async def __call__(self):
        if self.done:  # later calls only wait for the client's disconnect
            return await self.receive()
        remaining = self.deadline - time.monotonic()
        try:  # a timeout scope, not wait_for: that wraps each receive in a task of its own
            async with asyncio.timeout(max(0.0, min(self.idle_s, remaining))):
                message = await self.receive()
        except TimeoutError:
            if remaining <= self.idle_s:
                raise RequestTimeout(f"the request body did not arrive within {self.total_s:g} s",
                                     limit=self.total_s) from None
            raise RequestTimeout(f"no request body data for {self.idle_s:g} s", limit=self.idle_s) from None
        if message["type"] == "http.request":
            self.size += len(message.get("body", b""))
            if self.size > self.max_bytes:
                raise PayloadTooLarge(f"request body exceeds the limit of {self.max_bytes} bytes",
                                      limit=self.max_bytes)
            self.done = not message.get("more_body", False)
        else:
            self.done = True
        return message


class Gate:
    def __init__(self, app, runtime: Runtime):
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings = self.runtime.settings
        start = time.perf_counter()
        state = scope.setdefault("state", {})
        sent = {"status": None}

        head = scope["method"] == "HEAD"
        if head:  # HEAD wherever GET exists: the GET answer, headers only
            scope = dict(scope, method="GET")

        async def tracked_send(message):
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            elif head and message.get("body"):
                message = dict(message, body=b"")
            await send(message)

        admitted, held = False, 0
        try:
            path, method = scope["path"], scope["method"]
            headers = dict(scope.get("headers") or [])
            try:
                if path in PROTECTED or path.startswith(JOBS_PREFIX):
                    check_api_key(headers, settings.keys)
                if method == "POST":
                    limit, in_memory = self._body_limit(path, headers)
                    if path in INFERENCE:
                        self.runtime.admit()
                        admitted = True
                    if in_memory:  # a body without a declared size is counted at its limit
                        declared = headers.get(b"content-length", b"")
                        size = int(declared) if declared.isdigit() else limit
                        self.runtime.hold_body(size)
                        held = size
                    receive = BodyReader(receive, limit, settings.body_timeout_s, settings.body_idle_timeout_s)
            except ServiceError:
                await _discard_small_body(receive, headers, settings.body_idle_timeout_s)
                raise
            ceiling = settings.request_timeout_s + settings.body_timeout_s
            try:
                async with asyncio.timeout(ceiling):
                    await self.app(scope, receive, tracked_send)
            except TimeoutError:
                raise DeadlineExceeded(f"request did not finish within {ceiling:g} s", limit=ceiling) from None
        except Exception as exc:  # noqa: BLE001 - the last resort: a JSON answer, never a dropped connection
            if sent["status"] is None:
                await self._send_error(exc, scope, tracked_send)
            elif sent["status"] != 500:  # a 500 was logged where it was answered
                log.error("error after the response started on %s", scope["path"], exc_info=exc)
        finally:
            if admitted:
                self.runtime.release()
            if held:
                self.runtime.drop_body(held)
            self._count(scope, state, sent["status"] or 500, time.perf_counter() - start)

    def _body_limit(self, path: str, headers: dict[bytes, bytes]) -> tuple[int, bool]:
        """(the byte limit, whether the body is held in memory). JSON bodies and token payloads
        (/decode) are small by nature, and held; a raw body is one file (the per-file limit), a
        multipart body holds several (the per-request limit): both go to disk past 1 MiB."""
        settings = self.runtime.settings
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().decode("latin-1").lower()
        in_memory = ctype in JSON_TYPES or path == "/decode"
        if in_memory:
            limit, what = settings.max_json_bytes, " for JSON and token payloads"
        elif ctype == "multipart/form-data":
            limit, what = settings.max_request_bytes, ""
        else:
            limit, what = settings.max_upload_bytes, " for one uploaded file"
        limit = min(limit, settings.max_request_bytes)  # the per-request limit bounds every body
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"request body of {int(declared)} bytes exceeds the limit of {limit}{what}",
                                  limit=limit)
        return limit, in_memory

    async def _send_error(self, exc: Exception, scope, send) -> None:
        status, body, headers = error_body(exc)
        if status == 500:
            log.error("unhandled error on %s", scope["path"], exc_info=exc)
        if scope["path"].startswith(OPENAI_PREFIX):
            body = openai_shape(status, body)
        response = JSONResponse(body, status_code=status, headers=headers)
        await response(scope, _no_body, send)

    def _count(self, scope, state: dict, status: int, seconds: float) -> None:
        route = scope.get("route")
        label = getattr(route, "path", None) or (scope["path"] if scope["path"] in PROTECTED else "other")
        metrics = self.runtime.metrics
        metrics.requests.labels(label, state.get("modality", "none"), str(status)).inc()
        metrics.latency.labels(label).observe(seconds)


async def _discard_small_body(receive, headers: dict[bytes, bytes], idle_s: float) -> None:
    """Before refusing, read and drop a small body (never kept): a client still writing it would
    otherwise see the connection reset instead of our answer. Large bodies are not read at all."""
    declared = headers.get(b"content-length", b"")
    if not declared.isdigit() or int(declared) > DISCARD_BYTES:
        return
    read = 0
    try:
        async with asyncio.timeout(DISCARD_SECONDS):
            while read < int(declared):
                async with asyncio.timeout(idle_s):
                    message = await receive()
                if message["type"] != "http.request":
                    return
                read += len(message.get("body", b""))
                if not message.get("more_body"):
                    return
    except TimeoutError:
        return


async def _no_body():
    return {"type": "http.request", "body": b"", "more_body": False}
