"""The FastAPI application: lifespan, the error table's handlers, the gate (auth, admission,
body limits, deadlines, metrics) and the API document."""

from __future__ import annotations

import asyncio
import logging
import re
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.errors import ATokenError

from .errors import ServiceError, error_body, openai_shape
from .gate import Gate
from .media.errors import MediaError
from .openapi import document
from .routes import health, inference, jobs, openai, web
from .runtime import Runtime, default_backend_factory
from .settings import Settings
from .worker.backends import Backend

log = logging.getLogger("atoken.app")
VERSION = "0.1.0"


class ServiceApp(FastAPI):
    """FastAPI with the gate outermost: refusals decided from headers (401, 413, 429) are answered
    before any of Starlette's middleware runs, which keeps them cheap under overload."""

    def build_middleware_stack(self):
        return Gate(super().build_middleware_stack(), self.state.runtime)


def _allowed(request: Request, fallback: str | None) -> str | None:
    """The methods the API document lists for this path (Starlette names only those of the
    first route whose path matches, and /jobs/{ref} is served by three)."""
    spec = request.app.openapi()
    for template, methods in spec["paths"].items():
        pattern = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, request.url.path):
            return ", ".join(m.upper() for m in methods)
    return fallback


def create_app(settings: Settings | None = None, backend_factory: Callable[[], Backend] | None = None) -> FastAPI:
    settings = settings or Settings()
    runtime = Runtime(settings, backend_factory or default_backend_factory(settings))
    runtime.jobs = jobs.Jobs(runtime)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime.start()
        runtime.jobs.start()
        try:
            yield
        finally:
            await runtime.jobs.stop()
            await asyncio.get_running_loop().run_in_executor(None, runtime.stop)

    app = ServiceApp(title="AToken service", version=VERSION, lifespan=lifespan,
                  description="Tokenize, embed and reconstruct images, videos and 3D assets with AToken.")
    app.state.runtime = runtime

    async def _typed(request: Request, exc: Exception):
        status, body, headers = error_body(exc)
        if status == 500 and body["error"]["code"] == "internal_error":
            log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return JSONResponse(body, status_code=status, headers=headers)

    # Typed families are answered inside the router. Anything else is a bug: Starlette's error
    # middleware answers it with the JSON 500 below and re-raises, and the gate swallows the
    # re-raised error, so the connection stays usable.
    for family in (ServiceError, MediaError, ATokenError, Exception):
        app.add_exception_handler(family, _typed)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        body = {"error": {"code": code, "message": str(exc.detail)}}
        if request.url.path.startswith("/v1/"):
            body = openai_shape(exc.status_code, body)
        # Keep the router's headers: a 405 carries Allow, over every route of the path.
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405 and (allowed := _allowed(request, headers.get("Allow"))):
            headers["Allow"] = allowed
        return JSONResponse(body, status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse({"error": {"code": "invalid_parameter", "message": problems}}, status_code=422)

    app.include_router(health.router)
    app.include_router(inference.router)
    app.include_router(openai.router)
    app.include_router(jobs.router)
    web.mount(app)
    app.openapi = lambda: document(app)
    return app
