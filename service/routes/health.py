"""Liveness, readiness, metrics and model information."""

from __future__ import annotations

import platform

import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from ..deps import get_runtime
from ..runtime import Runtime

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="The worker is alive (or being restarted)")
def healthz(runtime: Runtime = Depends(get_runtime)):
    """200 while the front end supervises a live or restarting worker: a liveness probe must not
    kill the pod during a worker restart that the front end handles itself. 503 once the worker
    has failed to start several times in a row: then only a new pod can help."""
    s = runtime.scheduler
    alive = s.worker_alive()
    status = "ok" if alive else ("failing" if s.start_error else "starting")
    body = {"status": status, "worker_alive": alive, "restarts": s.restarts, "last_error": s.start_error}
    return body if s.live else JSONResponse(body, status_code=503)


@router.get("/readyz", summary="Model loaded, warmed up, canary round trip passed")
def readyz(runtime: Runtime = Depends(get_runtime)):
    s = runtime.scheduler
    if s.ready and s.worker_alive():
        return {"status": "ready", "model": s.info.get("variant")}
    body = {"error": {"code": "not_ready", "message": s.start_error or "the model worker is starting"}}
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


@router.get("/metrics", summary="Prometheus metrics")
def metrics(runtime: Runtime = Depends(get_runtime)):
    runtime.metrics.inflight.set(runtime.inflight)
    runtime.metrics.held_body_bytes.set(runtime.held_body_bytes)
    counts = runtime.jobs.store.counts() if runtime.jobs and runtime.jobs.store else None
    return Response(runtime.metrics.render(runtime.scheduler, counts), media_type="text/plain; version=0.0.4")


@router.get("/info", summary="Model, checkpoint, limits and versions")
def info(request: Request, runtime: Runtime = Depends(get_runtime)):
    import fastapi

    model = dict(runtime.model_info)
    if model and not model.get("trained", True):
        model["warning"] = "untrained model: outputs are not meaningful"
    return {
        "model": model,
        "ready": runtime.scheduler.ready,
        "worker": runtime.settings.worker,
        "limits": runtime.settings.public_limits(),
        "auth": bool(runtime.settings.keys),
        "url_fetch": runtime.settings.allow_url_fetch,
        "versions": {"service": request.app.version, "torch": torch.__version__, "fastapi": fastapi.__version__,
                     "python": platform.python_version()},
    }
