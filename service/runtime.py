"""What one running service holds: settings, metrics, the scheduler, and the bounded thread
pools for pre- and post-processing. Routes call `infer` and never touch the model."""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable

import torch
from fastapi import Request

from .errors import ClientClosedRequest, DeadlineExceeded, Overloaded, PayloadTooLarge, from_worker
from .media.detect import sniff
from .media.errors import MediaError
from .media.limits import MediaLimits
from .metrics import Metrics
from .inputs import Options
from .pipeline import Item, preprocess
from .priority import lower_thread_priority
from .scheduler import Scheduler
from .settings import Settings
from .uploads import DiskUpload
from .worker.backends import Backend, LocalBackend, ProcessBackend
from .worker.jobs import Job, JobResult


log = logging.getLogger("atoken.runtime")


# True while a job runs (POST /jobs, the CLI): no request waits on its model submissions, a
# video's tiles included, so job_timeout_s bounds them instead of request_timeout_s. Tasks
# started meanwhile (the tiles') inherit it.
AS_JOB: ContextVar[bool] = ContextVar("atoken_as_job", default=False)


def default_backend_factory(settings: Settings) -> Callable[[], Backend]:
    if settings.worker == "thread":
        return lambda: LocalBackend(settings.model_spec)
    if settings.worker == "triton":
        from .triton_backend import ANSWER_MARGIN_S, TritonBackend

        return lambda: TritonBackend(settings.triton_url, settings.triton_protocol,
                                      max_inflight_batches=settings.triton_inflight_batches,
                                      batches_ahead=settings.triton_batches_ahead, replicas=settings.triton_replicas,
                                      shared_memory=settings.triton_shared_memory,
                                      answer_timeout_s=max(settings.request_timeout_s, settings.job_timeout_s)
                                      + ANSWER_MARGIN_S)
    slots = settings.model_spec.engine_lanes if settings.lane_batches else 1
    calibration: dict = {}  # the first worker's measured speed, which the workers restarted after it reuse
    return lambda: ProcessBackend(settings.model_spec, slots=slots, calibration=calibration)


@dataclass
class Timing:
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    batch_size: int = 0

    def headers(self) -> dict[str, str]:
        return {"X-Queue-Time-Ms": f"{self.queue_ms:.1f}", "X-Compute-Time-Ms": f"{self.compute_ms:.1f}",
                "X-Batch-Size": str(self.batch_size)}


@dataclass
class Runtime:
    settings: Settings
    backend_factory: Callable[[], Backend]
    metrics: Metrics = field(default_factory=Metrics)
    inflight: int = 0
    held_body_bytes: int = 0  # declared sizes of the JSON and token bodies in flight (`hold_body`)
    jobs: object | None = None  # routes.jobs.Jobs, attached by the app

    def __post_init__(self) -> None:
        self.scheduler = Scheduler(self.backend_factory, self.settings.batching, self.metrics.on_batch,
                                   self.settings.liveness_failures)
        cpus = os.cpu_count() or 2
        # Heavy inputs (videos, meshes: seconds each) get their own pool, so they cannot hold
        # every thread while small images and JSON bodies wait behind them.
        self.light_pool = ThreadPoolExecutor(max(2, min(8, cpus)), thread_name_prefix="atoken-pre")
        self.heavy_pool = ThreadPoolExecutor(max(1, min(4, cpus // 2)), thread_name_prefix="atoken-heavy")
        self.post_pool = ThreadPoolExecutor(max(2, min(8, cpus)), thread_name_prefix="atoken-post")

    def start(self) -> None:
        if self.settings.worker in ("process", "triton"):
            # The model runs in another process; the front end's tensor work (patchify) is light
            # and must not compete with it for cores. In Triton mode the front end kept every
            # thread until this applied to it too: an OpenMP thread spinning after each small
            # op cost 6 ms of CPU per /encode at concurrency 1 (docs/performance.md).
            torch.set_num_threads(1)
        self.scheduler.start()
        self._lower_frontend_priority()

    def _lower_frontend_priority(self) -> None:
        """With `frontend_nice` > 0 this thread (the event loop) and the pool threads it starts
        later run at a lower CPU priority than the dispatcher thread, already started, and the
        worker it spawns. Linux nice values are per thread; elsewhere this is a no-op
        (`service/priority.py`). The default, 0, leaves them alone (see the setting)."""
        lower_thread_priority(self.settings.frontend_nice)

    def stop(self) -> None:
        self.scheduler.stop()
        for pool in (self.light_pool, self.heavy_pool, self.post_pool):
            pool.shutdown(wait=False, cancel_futures=True)

    @property
    def model_info(self) -> dict:
        return self.scheduler.info

    def admit(self) -> None:
        """Cheap checks before reading or decoding anything: answer 429 early. An admitted
        request counts as in flight until its response is ready (the gate releases it)."""
        if self.inflight >= self.settings.max_inflight_requests:
            raise Overloaded(f"{self.inflight} requests in flight", limit=self.settings.max_inflight_requests,
                             retry_after=self.scheduler.retry_after())
        self.scheduler.check_capacity()
        self.inflight += 1  # no await between the check and the count: atomic on the event loop

    def release(self) -> None:
        self.inflight -= 1

    def hold_body(self, size: int) -> None:
        """Counts a body held in memory (JSON, tokens) against max_json_inflight_bytes: 429 while
        the others leave no room, 413 if it could never fit. Freed by `drop_body`."""
        budget = self.settings.max_json_inflight_bytes
        if size > budget:
            raise PayloadTooLarge(f"a body of {size} bytes held in memory can never fit the limit of {budget} "
                                  "bytes for JSON and token bodies in flight", limit=budget)
        if self.held_body_bytes + size > budget:
            raise Overloaded(f"JSON and token bodies in flight hold {self.held_body_bytes} bytes; {size} more would "
                             f"pass the limit of {budget}", limit=budget, retry_after=1)
        self.held_body_bytes += size  # no await between the check and the count: atomic on the event loop

    def drop_body(self, size: int) -> None:
        self.held_body_bytes -= size

    async def _in_pool(self, pool: ThreadPoolExecutor, fn, *args):
        timeout = self.settings.request_timeout_s
        try:
            return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(pool, fn, *args), timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"{getattr(fn, '__name__', 'processing')} did not finish within {timeout:g} s",
                                   limit=timeout) from None

    async def preprocess_light(self, fn, *args):
        return await self._in_pool(self.light_pool, fn, *args)

    async def preprocess_heavy(self, fn, *args):
        """Video decoding and other long CPU work, off the light pool (see __post_init__)."""
        return await self._in_pool(self.heavy_pool, fn, *args)

    async def preprocess_all(self, uploads: list[bytes], options: Options,
                             limits: MediaLimits | None = None) -> list[Item]:
        """Every upload decoded (a video planned) in the pools, under `limits` (the settings')."""
        limits = limits or self.settings.limits
        self.scheduler.preparing += 1
        try:
            tasks = [self._in_pool(self._pool_for(data), preprocess, data, options, limits) for data in uploads]
            results = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self.scheduler.preparing -= 1
            self.scheduler.notify()
        for i, r in enumerate(results):
            if isinstance(r, BaseException):
                if len(uploads) > 1 and hasattr(r, "message"):
                    r.message = f"item {i}: {r.message}"
                raise r
        return list(results)

    def _pool_for(self, data) -> ThreadPoolExecutor:
        if isinstance(data, DiskUpload):
            return self.heavy_pool if data.looks_like_video() else self.light_pool
        try:
            modality, fmt = sniff(data)
        except MediaError:
            return self.light_pool  # refused at once in the pool, with the usual error
        return self.light_pool if modality == "image" or fmt == "npz" else self.heavy_pool

    async def postprocess(self, fn, *args):
        return await self._in_pool(self.post_pool, fn, *args)

    def model_deadline(self) -> tuple[float, str]:
        """How long a model submission may take here, and the setting that says so (`AS_JOB`)."""
        name = "job_timeout_s" if AS_JOB.get() else "request_timeout_s"
        return getattr(self.settings, name), name

    async def infer(self, watch, jobs: list[Job]) -> tuple[list[JobResult], Timing]:
        """Queue jobs, drop them if the caller gives up (`watch()` returns: the client left, the
        job was cancelled), raise the first item error. `watch` may be None."""
        submit = asyncio.ensure_future(self.scheduler.submit(jobs, *self.model_deadline()))
        watch = asyncio.ensure_future(watch() if watch else asyncio.Event().wait())
        done, _ = await asyncio.wait({submit, watch}, return_when=asyncio.FIRST_COMPLETED)
        if submit not in done:
            abandon(submit)  # the client left: its queued jobs are skipped
            raise ClientClosedRequest("the client closed the connection before the answer was ready")
        abandon(watch)
        results = submit.result()
        for i, r in enumerate(results):
            if r.error:
                err = from_worker(*r.error)
                if len(results) > 1 and hasattr(err, "args") and err.args:
                    err.args = (f"item {i}: {err.args[0]}",)
                raise err
        timing = Timing(max(r.extra.get("queue_ms", 0.0) for r in results),
                        max(r.compute_ms for r in results),
                        max(r.extra.get("batch_size", 0) for r in results))
        self.metrics.queue_time.observe(timing.queue_ms / 1e3)
        return results, timing


def abandon(future: asyncio.Future) -> None:
    """Cancel work that nobody will await, and read how it ends: an error it raises while it
    winds down (at shutdown, say, its pools already gone) is logged here, at debug level,
    instead of by its finalizer as "never retrieved", whenever the garbage collector runs."""
    future.cancel()
    future.add_done_callback(_read_outcome)


def _read_outcome(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.debug("abandoned work ended with %r", future.exception())


async def wait_disconnect(request: Request) -> None:
    """Return when the client goes away. Called once the body is read: the server's `receive`
    then waits for the disconnect (or the response's end), so one read is a wait, not a poll.
    (Starlette's `is_disconnected` cancels its read before middleware-wrapped `receive` can
    deliver the disconnect; a read in 0.25 s windows cost each request in flight four
    cancel scopes a second.)"""
    while (await request.receive()).get("type") != "http.disconnect":
        await asyncio.sleep(0.25)  # a server that answers at once with no news: read again later
