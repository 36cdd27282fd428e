"""Prometheus metrics, one registry per app (so tests can run several apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("atoken_requests", "HTTP requests", ["route", "modality", "status"], registry=r)
        self.latency = Histogram("atoken_request_latency_seconds", "End-to-end request latency", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("atoken_queue_time_seconds", "Time jobs wait for a batch",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("atoken_queue_depth", "Jobs waiting for the model", registry=r)
        self.queue_drain = Gauge("atoken_queue_drain_seconds",
                                 "Estimated seconds to finish the queued and running work (autoscaling signal)",
                                 registry=r)
        self.work_rate = Gauge("atoken_work_rate", "Model work the worker finishes a second, in short-sequence "
                               "token passes (measured at start, then over recent batches)", registry=r)
        self.batch_size = Histogram("atoken_batch_size", "Jobs per model batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.batch_tokens = Histogram("atoken_batch_tokens", "Token passes per model batch",
                                      buckets=(64, 256, 1024, 2048, 4096, 8192, 16384, 65536), registry=r)
        self.batch_seconds = Histogram("atoken_batch_seconds", "Model time per batch", buckets=LATENCY_BUCKETS,
                                       registry=r)
        self.worker_restarts = Gauge("atoken_worker_restarts", "Times the model worker was restarted", registry=r)
        self.ready = Gauge("atoken_ready", "1 when requests will be served", registry=r)
        self.running = Gauge("atoken_running_jobs", "Jobs in the batch the model worker runs now", registry=r)
        self.inflight = Gauge("atoken_inflight_requests", "Admitted requests not yet answered", registry=r)
        self.held_body_bytes = Gauge("atoken_held_body_bytes",
                                     "Declared bytes of the JSON and token bodies in flight", registry=r)
        self.dropped = Gauge("atoken_dropped_jobs", "Queued jobs skipped: client gone or deadline passed",
                             registry=r)
        # The job API (POST /jobs/{op}); "jobs" above are the model queue's units.
        self.jobs_submitted = Counter("atoken_async_jobs_submitted", "Jobs accepted by POST /jobs/{op}", ["op"],
                                      registry=r)
        self.jobs_by_status = Gauge("atoken_async_jobs", "Stored jobs by status", ["status"], registry=r)
        self.job_tiles = Counter("atoken_async_job_steps", "Tiles (or items) the job API has processed",
                                 registry=r)

    def on_batch(self, size: int, tokens: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_tokens.observe(tokens)
        self.batch_seconds.observe(seconds)

    def render(self, scheduler, job_counts: dict[str, int] | None = None) -> bytes:
        for status, count in (job_counts or {}).items():
            self.jobs_by_status.labels(status).set(count)
        self.queue_depth.set(scheduler.queue_depth)
        self.queue_drain.set(scheduler.drain_seconds())
        self.work_rate.set(scheduler.rate)
        self.worker_restarts.set(scheduler.restarts)
        self.ready.set(1 if scheduler.ready else 0)
        self.dropped.set(scheduler.dropped)
        self.running.set(scheduler.running_batch)
        return generate_latest(self.registry)
