"""Batches in flight for a remote engine (Triton): every request is answered, at most
`max_inflight_batches` batches are on the wire at once, also across a restart of the engine."""

import asyncio
import threading
import time

import numpy as np
import pytest

from service.errors import Overloaded, PayloadTooLarge, WorkerUnavailable
from service.scheduler import BatchingConfig, Scheduler
from service.worker.backends import WorkerDied
from service.worker.jobs import Job, JobResult, pixel_patches


class _Engine:
    def start(self) -> dict:
        return {"variant": type(self).__name__}

    def alive(self) -> bool:
        return True

    def stop(self) -> None:
        pass


class Remote(_Engine):
    """Takes two batches at once; the first engine dies mid-batch, the next ones live."""

    max_inflight_batches = 2
    started = 0
    running = 0
    most = 0
    lock = threading.Lock()

    def __init__(self):
        Remote.started += 1
        self.generation = Remote.started

    def run(self, jobs: list[Job]) -> list[JobResult]:
        with Remote.lock:
            Remote.running += 1
            Remote.most = max(Remote.most, Remote.running)
        try:
            time.sleep(0.05)
            if self.generation == 1:
                raise WorkerDied("connection reset")
            return [JobResult(j.id) for j in jobs]
        finally:
            with Remote.lock:
                Remote.running -= 1


def test_inflight_batches_are_bounded_and_survive_a_restart():
    scheduler = Scheduler(Remote, BatchingConfig(max_batch_tokens=1, max_wait_ms=0))
    scheduler.start()
    assert scheduler.wait_ready(5)

    async def ask(n: int) -> list:
        jobs = [[Job(scheduler.next_id(), "pool")] for _ in range(n)]  # cost 1: one job a batch
        return await asyncio.gather(*(scheduler.submit(j, 10) for j in jobs), return_exceptions=True)

    try:
        first = asyncio.run(ask(6))
        assert all(isinstance(r, (list, WorkerUnavailable)) for r in first)
        assert any(isinstance(r, WorkerUnavailable) for r in first)  # the first engine died
        deadline = time.monotonic() + 5
        while not scheduler.ready and time.monotonic() < deadline:
            time.sleep(0.05)
        second = asyncio.run(ask(12))
        assert all(isinstance(r, list) and r[0].error is None for r in second)
        assert Remote.most <= Remote.max_inflight_batches
        assert scheduler.running_batch == 0
    finally:
        scheduler.stop()


class Lanes(_Engine):
    """Runs two batches side by side, like the process worker's lanes; records batch sizes."""

    max_inflight_batches = 2
    share_slots = True
    sizes: list[int] = []

    def run(self, jobs: list[Job]) -> list[JobResult]:
        type(self).sizes.append(len(jobs))
        time.sleep(0.05)
        return [JobResult(j.id) for j in jobs]


class Remote2(Lanes):
    share_slots = False  # Triton: batches again on its side; a batch takes what is queued
    sizes: list[int] = []


def _burst(backend, n: int) -> list[int]:
    scheduler = Scheduler(backend, BatchingConfig(max_batch_tokens=64, max_wait_ms=0))
    scheduler.start()
    assert scheduler.wait_ready(5)
    try:
        async def ask() -> list:
            return await scheduler.submit([Job(scheduler.next_id(), "pool") for _ in range(n)], 10)

        assert len(asyncio.run(ask())) == n
    finally:
        scheduler.stop()
    return backend.sizes


def test_a_burst_on_idle_lanes_is_shared_between_them():
    assert _burst(Lanes, 9) == [5, 4]  # both lanes at once, not one batch of nine and an idle lane
    assert _burst(Remote2, 9) == [9]


class Following(_Engine):
    """A remote engine with two lanes that takes up to 8 batches, and past 3 on the wire wants
    small batches held back (TritonBackend.hold_after); records what it was sent."""

    max_inflight_batches = 8
    hold_after = 3

    def __init__(self):
        self.sizes, self.running, self.most = [], 0, 0
        self.lock = threading.Lock()

    def run(self, jobs: list[Job]) -> list[JobResult]:
        with self.lock:
            self.sizes.append(len(jobs))
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.05)
        with self.lock:
            self.running -= 1
        return [JobResult(j.id) for j in jobs]


def _stream(max_batch_tokens: int, jobs: int, every_s: float) -> Following:
    """`jobs` one-job requests, one every `every_s`, all answered."""
    engine = Following()
    scheduler = Scheduler(lambda: engine, BatchingConfig(max_batch_tokens=max_batch_tokens, max_wait_ms=0))
    scheduler.start()
    assert scheduler.wait_ready(5)

    async def ask() -> list:
        async def one(k: int):
            await asyncio.sleep(k * every_s)
            return await scheduler.submit([Job(scheduler.next_id(), "pool")], 10)
        return await asyncio.gather(*(one(k) for k in range(jobs)))

    try:
        assert all(r[0].error is None for r in asyncio.run(ask()))
    finally:
        scheduler.stop()
    assert sum(engine.sizes) == jobs
    return engine


def test_small_batches_wait_while_the_remote_has_work_and_full_ones_go():
    """Jobs arriving one at a time while the remote is busy join one request instead of taking
    a slot each (8 would be on the wire at once, one job in each); full batches never wait."""
    trickle = _stream(max_batch_tokens=64, jobs=60, every_s=0.004)
    assert trickle.most <= 3
    assert len(trickle.sizes) < 30 and max(trickle.sizes) >= 4
    burst = _stream(max_batch_tokens=2, jobs=48, every_s=0.0005)
    assert burst.most > 3
    assert max(burst.sizes) <= 2


class OneLane(Lanes):
    max_inflight_batches = 1
    sizes: list[int] = []


def _rate_after(backend, batches: int) -> float:
    scheduler = Scheduler(backend, BatchingConfig(max_batch_tokens=1, max_wait_ms=0, default_rate=1.0))
    scheduler.start()
    assert scheduler.wait_ready(5)
    try:
        async def ask() -> list:  # one job a batch, each 0.05 s: 20 batches/s per slot
            return await asyncio.gather(*(scheduler.submit([Job(scheduler.next_id(), "pool")], 1000)
                                          for _ in range(batches)))  # the rate starts at 1 a second

        asyncio.run(ask())
        return scheduler._rate
    finally:
        scheduler.stop()


def test_the_rate_counts_batches_side_by_side_together():
    """The queue's drain time (the autoscaling metric) divides by this rate: two lanes finish
    twice the work of one, not the same work each in twice the time."""
    one, two = _rate_after(OneLane, 24), _rate_after(Lanes, 48)
    assert 12 < one < 24  # cost 1 per 0.05 s, less scheduling slack
    assert 1.5 < two / one < 2.5


def test_a_cancelled_caller_leaves_nothing_unretrieved(caplog):
    """A caller cancelled while its jobs run (a client gone, a tile no longer needed) leaves no
    future whose error nobody read: asyncio would log each at garbage collection."""
    import gc

    scheduler = Scheduler(Lanes, BatchingConfig(max_batch_tokens=64, max_wait_ms=0))
    scheduler.start()
    assert scheduler.wait_ready(5)

    async def cancel_one() -> None:
        task = asyncio.ensure_future(scheduler.submit([Job(scheduler.next_id(), "pool") for _ in range(2)], 10))
        await asyncio.sleep(0.01)  # its batch is running
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0.1)  # the batch's answers arrive for nobody

    try:
        with caplog.at_level("ERROR", logger="asyncio"):
            asyncio.run(cancel_one())
            gc.collect()
        assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    finally:
        scheduler.stop()


class Timed(Lanes):
    """Reports a model (the encoder's widths) and its measured speed, as a worker does."""

    max_inflight_batches = 1
    sizes: list[int] = []

    def start(self) -> dict:
        return {"encoder": {"model_channels": 256, "mlp_channels": 1024}, "work": {"per_s": 1000.0}}


def _image_job(scheduler: Scheduler, side: int) -> Job:
    return Job(scheduler.next_id(), "tokenize", batch=pixel_patches(np.zeros((1, side, side, 3), np.uint8)))


def test_work_that_could_not_finish_in_time_is_refused_before_it_runs():
    """Attention makes an n-token sequence's time grow with n squared: 4,096 tokens are 4.1 s of
    token passes at this rate, but 15 s with attention (crossover 2 x 256 + 1024), over the
    10 s deadline; 1,024 tokens are 1.7 s."""
    scheduler = Scheduler(Timed, BatchingConfig(max_wait_ms=0))
    scheduler.start()
    assert scheduler.wait_ready(5)
    try:
        long, short = _image_job(scheduler, 1024), _image_job(scheduler, 512)
        assert long.cost == 4096 and scheduler.work([long]) == pytest.approx(4096 * (1 + 4096 / 1536))
        assert scheduler.drain_seconds(scheduler.work([long])) == pytest.approx(15.02, abs=0.01)
        with pytest.raises(PayloadTooLarge, match=r"deadline of 10 s \(request_timeout_s\)") as refused:
            asyncio.run(scheduler.submit([long], 10))
        assert refused.value.limit == 10 and "the job API (POST /jobs/{op}" in str(refused.value)
        with pytest.raises(PayloadTooLarge, match=r"\(job_timeout_s\)") as refused:  # already a job
            asyncio.run(scheduler.submit([long], 10, "job_timeout_s"))
        assert "job API" not in str(refused.value)
        assert asyncio.run(scheduler.submit([short], 10))[0].error is None
        assert Timed.sizes == [1]  # only the short job ran
    finally:
        scheduler.stop()


class Held(Timed):
    """Runs a batch only once released, so that what comes after it queues."""

    release = threading.Event()

    def run(self, jobs: list[Job]) -> list[JobResult]:
        Held.release.wait(10)
        return super().run(jobs)


def test_work_that_would_finish_after_its_deadline_behind_the_queue_is_429_at_once():
    """At 1000 units a second: one short job runs (held), one of 9.2 s waits; a 1.7 s job would
    end at 10.9 s, after its 10 s deadline: 429 now, with Retry-After, not 504 in 10 s. 0.7 s fits."""
    scheduler = Scheduler(Held, BatchingConfig(max_wait_ms=0))
    scheduler.start()
    assert scheduler.wait_ready(5)

    def job(tokens: int) -> Job:  # crossover 1536: work = tokens * (1 + tokens / 1536)
        return Job(scheduler.next_id(), "tokenize", batch=pixel_patches(np.zeros((1, 16, 16 * tokens, 3), np.uint8)))

    async def scenario():
        running = asyncio.ensure_future(scheduler.submit([job(16)], 10))
        while scheduler.running_batch == 0:
            await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(scheduler.submit([job(3072)], 10))  # 9,216 units
        await asyncio.sleep(0.05)
        assert scheduler.drain_seconds() == pytest.approx(9.216 + 0.016, abs=1e-3)  # the running one too
        with pytest.raises(Overloaded, match="deadline of 10 s") as busy:
            await scheduler.submit([job(1024)], 10)  # 1,707 units
        assert busy.value.retry_after == 10 and busy.value.limit == 10
        fits = asyncio.ensure_future(scheduler.submit([job(512)], 10))  # 683 units
        await asyncio.sleep(0.05)
        Held.release.set()
        return await asyncio.gather(running, queued, fits)

    try:
        assert all(r[0].error is None for r in asyncio.run(scenario()))
    finally:
        scheduler.stop()
