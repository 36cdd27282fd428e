"""The job API: POST /jobs/{op} (202), GET /jobs/{id}, GET /jobs/{id}/result, DELETE /jobs/{id}.
Same inputs, options and answers as the synchronous routes (service.ops)."""

from __future__ import annotations

import asyncio
import json
from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from .. import ops
from ..deps import get_runtime, options_from_raw, parse_options, read_uploads
from ..errors import InvalidParameter, JobGone, JobNotFinished
from ..gate import supplied_key
from ..jobs import OPS, JobRunner, JobStore, describe, owner_of
from ..runtime import AS_JOB, Runtime
from ..uploads import release

router = APIRouter(tags=["jobs"])


def _owner(request: Request, runtime: Runtime) -> str:
    """Jobs belong to the caller's key (the gate has checked it)."""
    if not runtime.settings.keys:
        return ""
    return owner_of(supplied_key(dict(request.scope["headers"])) or None)


def _store(runtime: Runtime) -> JobStore:
    return runtime.jobs.store


# One path, /jobs/{ref}: POST names an operation, GET and DELETE a job id (OpenAPI forbids two
# templates of the same shape, and one path gives one honest Allow header).
@router.post("/jobs/{ref}", status_code=202, summary="Start an asynchronous encode, tokenize or reconstruct")
async def submit(ref: str, request: Request, runtime: Runtime = Depends(get_runtime)):
    op = ref
    if op not in OPS:
        raise InvalidParameter(f"POST /jobs/{{op}} takes op = {', '.join(OPS)}; got {op!r}")
    uploads, fields = await read_uploads(request, runtime)
    try:
        options, raw = parse_options(request, fields)
        # Refuse bad input now, not minutes later: headers are read and limits checked (a video's
        # frames are not decoded here; that happens tile by tile when the job runs).
        items = await runtime.preprocess_all(uploads, options, runtime.settings.without_deadlines().limits)
        if op != "encode":
            ops.check_mode(runtime, options.tokens)
        progress = ops.progress_for(items)
        record = {"raw": raw, "accept": request.headers.get("accept", "")}
        store = _store(runtime)
        job = await asyncio.get_running_loop().run_in_executor(
            None, store.create, _owner(request, runtime), op, uploads, record, progress.total, progress.unit)
    finally:
        release(uploads)  # a large upload was moved into the job's files; nothing else is kept
    runtime.jobs.runner.submitted()
    runtime.metrics.jobs_submitted.labels(op).inc()
    body = describe(job)
    return JSONResponse(body, status_code=202, headers={"Location": body["links"]["self"]})


@router.get("/jobs/{ref}", summary="A job's status, progress and error")
def status(ref: str, request: Request, runtime: Runtime = Depends(get_runtime)):
    return describe(_store(runtime).get(ref, _owner(request, runtime)))


@router.get("/jobs/{ref}/result", summary="The finished job's answer, as the synchronous route gives it")
def result(ref: str, request: Request, runtime: Runtime = Depends(get_runtime)):
    job_id = ref
    store = _store(runtime)
    job = store.get(job_id, _owner(request, runtime))
    if job["expired"]:
        raise JobGone(f"job {job_id}'s result expired (results are kept {store.config.ttl_s:g} s)")
    if job["status"] == "cancelled":
        raise JobGone(f"job {job_id} was cancelled")
    if job["status"] in ("queued", "running"):
        retry = max(1, min(30, int(job["eta_s"] or 2)))
        raise JobNotFinished(f"job {job_id} is {job['status']} ({job['done']} of {job['total']} {job['unit']})",
                             retry_after=retry)
    if job["status"] == "failed":
        error = json.loads(job["error"])
        return JSONResponse(error["body"], status_code=error["status"])
    headers = json.loads(job["headers"] or "{}")
    path = store.result_path(job_id)
    if not path.exists():
        raise JobGone(f"job {job_id}'s result is no longer stored")
    return FileResponse(path, media_type=job["media_type"], headers=headers)


@router.delete("/jobs/{ref}", summary="Cancel a job (at its next tile) and delete its files")
def cancel(ref: str, request: Request, runtime: Runtime = Depends(get_runtime)):
    job_id = ref
    store = _store(runtime)
    job = store.get(job_id, _owner(request, runtime))
    if job["status"] == "running" and runtime.jobs.runner.cancel(job_id):
        return JSONResponse(describe(job) | {"status": "cancelling"}, status_code=202)
    if job["status"] in ("queued", "running"):
        store.cancel(job_id)
        return JSONResponse(describe(store.get(job_id, job["owner"])))
    store.delete(job_id)
    return Response(status_code=204)


class Jobs:
    """The store and runner on the runtime (created with the app, started in its lifespan)."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.store: JobStore | None = None  # opened at start: building an app touches no disk
        self.runner: JobRunner | None = None

    def start(self) -> None:
        self.store = JobStore(self.runtime.settings.jobs)
        self.runner = JobRunner(self.store, self._execute, self.runtime.metrics.job_tiles.inc)
        self.runner.start()

    async def stop(self) -> None:
        if self.runner:
            await self.runner.stop()
        if self.store:
            self.store.close()

    async def _execute(self, job: dict, uploads: list[bytes], cancel: asyncio.Event, report) -> ops.Answer:
        runtime = self.runtime
        request = json.loads(job["request"])
        raw = request["raw"]
        options = options_from_raw(raw)
        items = await runtime.preprocess_all(uploads, options, runtime.settings.without_deadlines().limits)
        progress = ops.progress_for(items)
        progress.on_change = lambda p: report(p.done, p.total, p.eta_s)
        self.store.set_running(job["id"], progress.total, progress.unit)
        call = ops.Call(request["accept"], cancel.wait, progress)
        as_job = AS_JOB.set(True)  # its model passes, tiles included: job_timeout_s
        try:
            # A JSON answer is stored as the bytes the synchronous route sends (jobs._body_of).
            if job["op"] == "encode":
                return await ops.encode(runtime, items, options, raw, call)
            if job["op"] == "tokenize":
                return await ops.tokenize(runtime, items, options, call)
            return await ops.reconstruct(runtime, items, options, call)
        finally:
            AS_JOB.reset(as_job)
