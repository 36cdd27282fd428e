"""The FastAPI application: lifespan, the error table's handler, body limit and metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.errors import ATokenError

from .errors import PayloadTooLarge, ServiceError, error_body
from .media.errors import MediaError
from .routes import health, inference
from .runtime import Runtime, default_backend_factory
from .settings import Settings
from .worker.backends import Backend

log = logging.getLogger("atoken.app")
VERSION = "0.1.0"


class BodyLimit:
    """ASGI middleware: read the body up to the request limit (declared length or not) and
    answer 413 before the app sees it; otherwise replay it to the app unchanged."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _send_error(send, PayloadTooLarge(
                f"request body of {int(declared)} bytes exceeds the limit of {self.max_bytes}", limit=self.max_bytes))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await _send_error(send, PayloadTooLarge(
                    f"request body exceeds the limit of {self.max_bytes} bytes", limit=self.max_bytes))
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later calls: wait for the client's disconnect

        return await self.app(scope, replay, send)


async def _send_error(send, exc: Exception) -> None:
    status, body, headers = error_body(exc)
    response = JSONResponse(body, status_code=status, headers=headers)
    await send({"type": "http.response.start", "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in response.headers.items()]})
    await send({"type": "http.response.body", "body": response.body})


def create_app(settings: Settings | None = None, backend_factory: Callable[[], Backend] | None = None) -> FastAPI:
    settings = settings or Settings()
    runtime = Runtime(settings, backend_factory or default_backend_factory(settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, runtime.stop)

    app = FastAPI(title="AToken service", version=VERSION, lifespan=lifespan,
                  description="Tokenize, embed and reconstruct images, videos and 3D assets with AToken.")
    app.state.runtime = runtime

    async def _typed(request: Request, exc: Exception):
        status, body, headers = error_body(exc)
        if status >= 500 and body["error"]["code"] == "internal_error":
            log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return JSONResponse(body, status_code=status, headers=headers)

    # Typed families first (handled inside the router, the connection stays healthy); the
    # bare Exception entry is the last resort for bugs and answers a JSON 500.
    for family in (ServiceError, MediaError, ATokenError, Exception):
        app.add_exception_handler(family, _typed)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"error": {"code": code, "message": str(exc.detail)}}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return JSONResponse({"error": {"code": "invalid_parameter", "message": str(exc.errors())}}, status_code=422)

    @app.middleware("http")
    async def _observe(request: Request, call_next):
        start = time.perf_counter()
        inference_route = request.url.path in ("/encode", "/tokenize", "/decode", "/reconstruct")
        try:
            response = await call_next(request)
        finally:
            if getattr(request.state, "admitted", False):
                runtime.inflight -= 1
        if inference_route:
            modality = getattr(request.state, "modality", "none")
            runtime.metrics.requests.labels(request.url.path, modality, str(response.status_code)).inc()
            runtime.metrics.latency.labels(request.url.path).observe(time.perf_counter() - start)
        return response

    app.include_router(health.router)
    app.include_router(inference.router)
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    return app
