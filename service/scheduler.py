"""Dynamic batching between the HTTP front end and the model worker.

Requests put jobs into one bounded FIFO queue. A dispatcher thread forms batches: it takes
the oldest job, then keeps adding jobs in arrival order while the batch's compute cost (token
passes) stays under the cap, waiting at most `max_wait_ms` after the oldest arrived. FIFO
order means a large job delays small ones by at most one batch and is never overtaken
forever. Expired or abandoned jobs are dropped before they reach the model. When the worker
dies, the jobs it held fail with WorkerUnavailable, readiness drops, and it is restarted.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from .errors import DeadlineExceeded, NotReady, Overloaded, PayloadTooLarge, WorkerUnavailable
from .worker.backends import Backend, WorkerDied
from .worker.jobs import Job, JobResult, WorkPrice

log = logging.getLogger("atoken.scheduler")
IDLE_POLL_S = 0.1  # how often an idle dispatcher checks that the worker is still alive
MAX_RETRY_AFTER_S = 60
# A batch still running this long after the last of its jobs' deadlines has no one left to
# answer, and a worker that has not answered by then has hung (a deadlock, a stuck GPU): the
# watchdog aborts it, which fails the batches it holds with 503 and restarts it.
HUNG_AFTER_S = 60.0
WATCHDOG_POLL_S = 0.5


@dataclass
class Pending:
    job: Job
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    deadline: float  # monotonic seconds
    work: float = 0.0  # WorkPrice: the time it will take, in units of the worker's rate
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    started: float | None = None

    def resolve(self, result: JobResult | None = None, error: Exception | None = None) -> None:
        def _set() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        self.loop.call_soon_threadsafe(_set)


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_tokens: int = 8192  # token passes per batch
    max_wait_ms: float = 5.0
    max_queue_jobs: int = 256
    max_queue_tokens: int = 262144
    default_rate: float = 2000.0  # work (WorkPrice units) per second, until the worker's own is known


class Scheduler:
    def __init__(self, backend_factory: Callable[[], Backend], config: BatchingConfig,
                 on_batch: Callable[[int, int, float], None] | None = None, liveness_failures: int = 3):
        self.backend_factory = backend_factory
        self.config = config
        self.on_batch = on_batch
        self.backend: Backend | None = None
        self.info: dict = {}
        self.ready = False
        self.restarts = 0
        self.batches = 0
        self.start_error: str | None = None
        self.start_failures = 0  # consecutive failed starts; liveness fails past `liveness_failures`
        self.liveness_failures = liveness_failures
        self.running_batch = 0  # jobs in the batch the worker holds now
        self.preparing = 0  # admitted requests still being decoded: batch-mates on their way
        self.dropped = 0  # queued jobs skipped because their caller left or their deadline passed
        self._queue: deque[Pending] = deque()
        self._queued_cost = 0
        self._queued_work = 0.0
        self._running_work = 0.0  # of the batches the worker holds, counted whole until they end
        self._price = WorkPrice()  # of the worker's model
        self._cond = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        self._rate = config.default_rate  # work per second, over recent batches
        # Decayed sums of finished work and of the time it took, the batches in flight counted
        # together (`_run_batch`); their ratio is the rate, until measured the worker's own.
        self._done_work, self._done_s = config.default_rate * 0.1, 0.1
        self._last_done = 0.0
        self._watched: dict[int, tuple[float, Backend]] = {}  # running batches: (answer by, backend)
        self._batch_keys = itertools.count()
        self._watchdog: threading.Thread | None = None
        self._inflight: _Slots | None = None  # batch slots, for backends that take several
        self._batch_pool: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._dispatch_loop, name="atoken-dispatcher", daemon=True)
        self._thread.start()
        self._watchdog = threading.Thread(target=self._watch_loop, name="atoken-watchdog", daemon=True)
        self._watchdog.start()

    def stop(self) -> None:
        with self._cond:
            self._running = False
            pending = list(self._queue)
            self._queue.clear()
            self._queued_cost, self._queued_work = 0, 0.0
            self._cond.notify_all()
        for p in pending:
            p.resolve(error=WorkerUnavailable("the service is shutting down"))
        if self._thread:
            self._thread.join(10)
        if self._batch_pool:
            self._batch_pool.shutdown(wait=True)  # batches on the wire get their answers
        if self.backend:
            self.backend.stop()

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready:
                return True
            time.sleep(0.05)
        return self.ready

    def worker_alive(self) -> bool:
        return self.backend is not None and self.backend.alive()

    @property
    def live(self) -> bool:
        """False once the worker has failed to start `liveness_failures` times in a row: only
        then would restarting the whole pod help."""
        return self.start_failures < self.liveness_failures

    # ------------------------------------------------------------------ admission
    def next_id(self) -> int:
        return next(self._ids)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def queued_cost(self) -> int:
        return self._queued_cost

    @property
    def rate(self) -> float:
        """Work (WorkPrice units) the worker finishes a second, over recent batches."""
        return self._rate

    def drain_seconds(self, extra_work: float = 0.0) -> float:
        """Estimated time to finish everything queued and running (and `extra_work` more), for
        429s and autoscaling. A running batch counts whole: it errs long by what it has done, where
        leaving it out let requests in behind a minute of 3D work that then answered 504."""
        return (self._queued_work + self._running_work + extra_work) / max(self._rate, 1e-9)

    def retry_after(self, extra_work: float = 0.0) -> int:
        return min(MAX_RETRY_AFTER_S, max(1, math.ceil(self.drain_seconds(extra_work))))

    def work(self, jobs: list[Job]) -> float:
        return sum(map(self._price, jobs))

    def check_time(self, work: float, timeout_s: float, timeout_name: str = "request_timeout_s") -> None:
        """Raise PayloadTooLarge when work this long would outrun the deadline even on an idle
        worker: refused before it runs, not answered 504 after it has run to no one; and
        Overloaded when, behind the work queued and running now, it would finish after the
        deadline (429 at once, not 504 when the deadline comes)."""
        seconds = work / max(self._rate, 1e-9)
        if seconds > timeout_s:
            # A request's remedy on a slow worker is the job API, whose deadline is its own.
            as_job = " or the job API (POST /jobs/{op}, job_timeout_s)" if timeout_name == "request_timeout_s" else ""
            raise PayloadTooLarge(f"this request would take about {seconds:.0f} s of model time on this worker, "
                                  f"more than the deadline of {timeout_s:g} s ({timeout_name}); "
                                  f"send fewer tokens (a smaller asset, a lower resolution, fewer frames){as_job}",
                                  limit=timeout_s)
        if self.drain_seconds(work) > timeout_s:
            raise Overloaded(f"the worker holds about {self.drain_seconds():.0f} s of model work: this request "
                             f"would finish after its deadline of {timeout_s:g} s ({timeout_name})",
                             retry_after=self.retry_after(), limit=timeout_s)

    def check_capacity(self, jobs: int = 1, cost: int = 0, work: float = 0.0) -> None:
        """Raise Overloaded when these jobs would not fit in the queue now (cheap; call early),
        and PayloadTooLarge when they could never fit, however long the client waited."""
        cfg = self.config
        if jobs > cfg.max_queue_jobs or cost > cfg.max_queue_tokens:
            raise PayloadTooLarge(f"{jobs} jobs costing {cost} token passes can never fit the queue "
                                  f"({cfg.max_queue_jobs} jobs, {cfg.max_queue_tokens} token passes)",
                                  limit=cfg.max_queue_tokens)
        if not self.ready:
            raise NotReady("the model worker is not ready", retry_after=5)
        if len(self._queue) + jobs > cfg.max_queue_jobs or self._queued_cost + cost > cfg.max_queue_tokens:
            raise Overloaded(
                f"queue full ({len(self._queue)} jobs, {self._queued_cost} token passes queued)",
                retry_after=self.retry_after(work), limit=cfg.max_queue_jobs,
            )

    def notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    async def submit(self, jobs: list[Job], timeout_s: float, timeout_name: str = "request_timeout_s") -> list[JobResult]:
        """Queue the jobs and wait for all results; cancelled callers drop their queued work.
        `timeout_name`: the setting `timeout_s` comes from, named when it refuses them."""
        prices = [self._price(j) for j in jobs]
        self.check_capacity(len(jobs), sum(j.cost for j in jobs), sum(prices))
        self.check_time(sum(prices), timeout_s, timeout_name)
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout_s
        pending = [Pending(j, loop.create_future(), loop, deadline, w) for j, w in zip(jobs, prices)]
        with self._cond:
            for p in pending:
                self._queue.append(p)
                self._queued_cost += p.job.cost
                self._queued_work += p.work
            self._cond.notify_all()
        gathered = asyncio.gather(*(p.future for p in pending))
        try:
            return list(await asyncio.wait_for(gathered, timeout_s))
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"request did not finish within its deadline of {timeout_s:g} s ({timeout_name})",
                                   limit=timeout_s) from None
        finally:
            for p in pending:
                p.cancelled = True  # anything still queued is skipped
            # A caller cancelled (a client gone, a tile no longer needed) leaves the gathering
            # future done with its own CancelledError, which nobody reads: read here, it is not
            # logged as an error at garbage collection.
            if gathered.done() and not gathered.cancelled():
                gathered.exception()

    # ------------------------------------------------------------------ dispatch
    def _dispatch_loop(self) -> None:
        while self._running:
            if self.backend is None or not self.backend.alive():
                self._start_backend()
                continue
            # A remote engine (Triton) batches again on its side: keep several batches on the
            # wire so that it sees enough requests at once, and a slot frees as each returns.
            # The slot comes first and the batch after: while every slot is taken, jobs that
            # arrive join the batch that waits for the next one instead of forming batches of
            # their own (under load, small batches cost the remote model per pass).
            slots = self._inflight  # a restart makes new slots; each batch frees the one it took
            if slots is not None:
                slots.acquire()
                self._hold_small_batch(slots)
            batch = self._form_batch(slots.free + 1 if slots is not None and slots.share else 1)
            if not batch:
                if slots is not None:
                    slots.release()
                continue
            if slots is None:
                self._run_batch(batch)
                continue
            self._batch_pool.submit(self._run_batch_in_slot, self.backend, batch, slots)

    def _hold_small_batch(self, slots: _Slots) -> None:
        """Follows the queue for a remote engine that joins batches itself (Triton): once
        `slots.hold_after` batches are on the wire (one per lane at the server, running, and
        those waiting behind them), another goes only when a full batch is queued or one comes
        back. Until then the remote has work and a batch sent early would be joined there
        anyway; waiting, the jobs arriving meanwhile travel as one request instead of several,
        and each request costs CPU on both sides of the hop (docs/performance.md)."""
        if slots.hold_after is None:
            return
        with self._cond:
            while (self._running and slots.taken - 1 >= slots.hold_after
                   and self._queued_cost < self.config.max_batch_tokens):
                self._cond.wait(IDLE_POLL_S)

    def _run_batch_in_slot(self, backend: Backend, batch: list[Pending], slots: _Slots) -> None:
        try:
            self._run_batch(batch, backend)
        finally:
            slots.release()
            if slots.hold_after is not None:
                with self._cond:
                    self._cond.notify_all()  # a batch held back for this slot's return may go

    def _start_backend(self) -> None:
        self.ready = False
        if self.backend is not None:  # it died while idle: noticed here, restarted at once
            self.restarts += 1
            log.error("model worker exited while idle; restarting")
            self.backend.stop()
            self.backend = None
        try:
            backend = self.backend_factory()
            self.info = backend.start()
            self._price = WorkPrice.of(self.info)
            if rate := (self.info.get("work") or {}).get("per_s"):  # the worker's own, timed
                with self._cond:
                    self._rate = rate
                    self._done_work, self._done_s = rate * 0.1, 0.1
            slots = getattr(backend, "max_inflight_batches", 1)
            self._inflight = (_Slots(slots, getattr(backend, "share_slots", False), getattr(backend, "hold_after", None))
                              if slots > 1 else None)
            if slots > 1 and self._batch_pool is None:
                self._batch_pool = ThreadPoolExecutor(slots, thread_name_prefix="atoken-batch")
            self.backend = backend
            self.start_error = None
            self.start_failures = 0
            self.ready = True
            log.info("model worker ready: %s", self.info.get("variant"))
        except Exception as exc:  # noqa: BLE001 - keep serving health endpoints; retry
            self.start_error = f"{type(exc).__name__}: {exc}"
            self.start_failures += 1
            log.error("model worker failed to start: %s", self.start_error)
            with self._cond:
                self._cond.wait(2.0)

    def _take_expired(self, now: float) -> list[Pending]:
        dropped = []
        while self._queue and (self._queue[0].cancelled or self._queue[0].deadline <= now):
            dropped.append(self._pop())
        return dropped

    def _pop(self) -> Pending:
        p = self._queue.popleft()
        self._queued_cost -= p.job.cost
        self._queued_work -= p.work
        return p

    def _form_batch(self, ways: int = 1) -> list[Pending]:
        """The next batch; with `ways` free slots that share out work, about 1/ways of what is
        queued, so that a burst on an idle worker runs on all its lanes at once."""
        cfg = self.config
        with self._cond:
            while self._running and not self._queue:
                if not self.worker_alive():
                    self.ready = False
                    return []  # the dispatch loop restarts it now, not when the next request comes
                self._cond.wait(IDLE_POLL_S)
            if not self._running:
                return []
            first_arrival = self._queue[0].enqueued
            while True:
                now = time.monotonic()
                self._fail_dropped(self._take_expired(now))
                queued = self._queued_cost
                wait = cfg.max_wait_ms / 1e3 - (now - first_arrival)
                # Waiting only pays when more work is on its way; a lone request goes at once.
                if not self._queue or queued >= cfg.max_batch_tokens or wait <= 0 or self.preparing == 0:
                    break
                self._cond.wait(wait)
            cap = cfg.max_batch_tokens if ways <= 1 else min(cfg.max_batch_tokens, -(-self._queued_cost // ways))
            batch, cost = [], 0
            while self._queue:
                p = self._queue[0]
                if p.cancelled or p.deadline <= time.monotonic():
                    self._fail_dropped([self._pop()])
                    continue
                if batch and cost + p.job.cost > cap:
                    break
                batch.append(self._pop())
                cost += p.job.cost
            return batch

    def _fail_dropped(self, dropped: list[Pending]) -> None:
        self.dropped += len(dropped)
        for p in dropped:
            if not p.cancelled:
                p.resolve(error=DeadlineExceeded("the request's deadline passed while it was queued"))

    def _watch_loop(self) -> None:
        """Aborts a worker whose batch outlives every deadline in it by HUNG_AFTER_S. Backends
        that cannot be aborted (a thread in this process) are left; Triton's client gives up on
        its own (`TritonBackend.answer_timeout_s`)."""
        while self._running:
            time.sleep(WATCHDOG_POLL_S)
            now = time.monotonic()
            with self._cond:
                hung = [key for key, (answer_by, _) in self._watched.items() if now > answer_by]
                backends = {id(b): b for _, b in (self._watched.pop(key) for key in hung)}
            for backend in backends.values():
                if hasattr(backend, "abort"):
                    log.error("a batch outlived its deadlines by %g s: the model worker has hung; killing it", HUNG_AFTER_S)
                    backend.abort(f"no answer {HUNG_AFTER_S:g} s past the batch's deadlines: the worker hung and was killed")

    def _worker_died(self, backend: Backend, batch: list[Pending], exc: WorkerDied) -> None:
        with self._cond:
            if self.backend is backend:  # the first batch to notice restarts it
                self.ready = False
                self.restarts += 1
                self.backend = None
        log.error("model worker died: %s; restarting", exc)
        for p in batch:
            p.resolve(error=WorkerUnavailable(f"the model worker died while running this request ({exc}); "
                                              "it is being restarted, retry shortly", retry_after=5))

    def _ended(self, key: int, batch: list[Pending], work: float) -> None:
        """A batch the worker held is over, whatever its end: no longer running nor watched."""
        with self._cond:
            self.running_batch -= len(batch)
            self._running_work -= work
            self._watched.pop(key, None)

    def _run_batch(self, batch: list[Pending], backend: Backend | None = None) -> None:
        backend = backend or self.backend
        start = time.monotonic()
        for p in batch:
            p.started = start
        key = next(self._batch_keys)
        work = sum(p.work for p in batch)
        with self._cond:
            self.running_batch += len(batch)
            self._running_work += work
            self._watched[key] = (max(p.deadline for p in batch) + HUNG_AFTER_S, backend)
        try:
            results = backend.run([p.job for p in batch])
        except WorkerDied as exc:
            results = exc
        finally:
            self._ended(key, batch, work)  # before any answer: a caller may look at once
        if isinstance(results, WorkerDied):
            self._worker_died(backend, batch, results)
            return
        now = time.monotonic()
        elapsed = now - start
        cost = sum(p.job.cost for p in batch)
        with self._cond:
            # With batches side by side (lanes, Triton) a batch's own cost over its own time is
            # a fraction of what the worker does: it is charged the time since the last batch
            # finished instead, so the rate (and the queue's drain time, the autoscaling
            # metric) counts them together. One batch at a time, that is its own time.
            self._done_work = 0.8 * self._done_work + work
            self._done_s = 0.8 * self._done_s + (now - max(start, self._last_done))
            self._last_done = now
            if self._done_s > 0:
                self._rate = self._done_work / self._done_s
        self.batches += 1
        if self.on_batch:
            self.on_batch(len(batch), cost, elapsed)
        for p, r in zip(batch, results):
            r.extra["queue_ms"] = (start - p.enqueued) * 1e3
            r.extra["batch_size"] = len(batch)
            p.resolve(r)


class _Slots:
    """Batches a backend takes at once: a slot is taken before a batch forms and freed when its
    answer comes. `share`: the backend runs its batches side by side (the process worker's
    lanes), so free slots split what is queued between them. `hold_after`: batches on the wire
    past which a small one waits (`Scheduler._hold_small_batch`); None: never."""

    def __init__(self, n: int, share: bool, hold_after: int | None = None):
        self.share, self.hold_after, self.n = share, hold_after, n
        self._semaphore = threading.BoundedSemaphore(n)
        self._lock = threading.Lock()
        self.free = n  # after the taken ones

    @property
    def taken(self) -> int:
        return self.n - self.free

    def acquire(self) -> None:
        self._semaphore.acquire()
        with self._lock:
            self.free -= 1

    def release(self) -> None:
        with self._lock:
            self.free += 1
        self._semaphore.release()
