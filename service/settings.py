"""Settings from environment variables (prefix ATOKEN_), e.g. ATOKEN_MAX_UPLOAD_BYTES=1000000."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .jobs import JobsConfig
from .media.limits import MediaLimits
from .scheduler import BatchingConfig
from .worker.loader import ModelSpec


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ATOKEN_", env_file=None, extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    # One log line per request; off by default: /metrics counts every response, and logging
    # each refusal of a flood would itself cost CPU.
    access_log: bool = False

    # The model (empty checkpoint: the default model that ships with the project).
    checkpoint: str | None = None
    config: str | None = Field(None, description="official YAML config or variant name for the checkpoint")
    variant: str | None = Field(None, description="no checkpoint: serve this variant with random weights")
    gs_checkpoint: str | None = None
    gs_config: str | None = None
    discrete_checkpoint: str | None = None  # tokens=discrete from a second model (FSQ fine-tune)
    discrete_config: str | None = None
    # auto: bfloat16 where the hardware has native bf16 units (AVX512-BF16/AMX CPUs, GPUs that
    # support it), else float32; accuracy bounds in docs/performance.md. Parity: float32.
    dtype: str = "auto"
    device: str = "cpu"
    threads: int = 0
    # Lanes: a batch is cut into this many parts run side by side, one core each (0: one per
    # core on a CPU, 1 on a GPU); measured in docs/performance.md.
    lanes: int = 0
    # The process worker takes one batch per lane at once and runs them side by side, instead
    # of cutting each batch across the lanes: the same load then makes lane passes twice as
    # large, which cost less per image (/encode at concurrency 8: 1.075x; docs/performance.md).
    lane_batches: bool = True
    worker: str = Field("process", description="process | thread | triton")
    triton_url: str | None = None
    triton_protocol: Literal["http", "grpc"] = "http"
    # Batches one front end keeps at Triton at once, at most. No fixed number was best on one
    # 2-core machine (docs/performance.md): few starve the dynamic batcher under light load,
    # many cut the jobs into small requests under heavy load; the next setting follows the queue.
    triton_inflight_batches: int = Field(8, ge=1, le=64)
    # Of those, batches waiting at Triton behind one per lane of its model: past them a front
    # end sends a batch only when a full one is queued or one comes back, so under load jobs
    # travel in fewer, larger requests (docs/performance.md). 64: every batch goes at once.
    triton_batches_ahead: int = Field(1, ge=0, le=64)
    # Triton servers behind ATOKEN_TRITON_URL (a Service over several pods): a front end keeps
    # a batch per lane and those ahead for each of them (the Helm chart sets its replica count).
    triton_replicas: int = Field(1, ge=1, le=64)
    # Inputs through system shared memory (service/triton_shm.py): auto = when the server's
    # address is loopback and it can map our regions (else the wire); on = required; off.
    triton_shared_memory: Literal["auto", "on", "off"] = "auto"

    # Batching and backpressure.
    # Token passes per batch; unset: 2048 on CPU (batch 8 of 256-token images is where this CPU
    # peaks: docs/benchmarks/model_cpu.md; larger batches are slower per item), 8192 on GPUs.
    max_batch_tokens: int | None = None
    # tokenize-dataset's cap, where no one waits on a batch: on 2 cores its local engine ran
    # 2,000 images 1.14x faster at 8192 than at the service's 2048 (8 paired runs; 16384 no
    # faster; docs/bulk.md). A run records it: packed passes of other shapes round differently.
    bulk_batch_tokens: int = Field(8192, ge=1)
    max_wait_ms: float = 5.0
    max_queue_jobs: int = 256
    max_queue_tokens: int = 262144
    request_timeout_s: float = 120.0
    # A job's (POST /jobs/{op}, the CLI) model passes have no request to answer in time: this
    # bounds each one instead (a 3D asset's can pass the request timeout on a CPU).
    job_timeout_s: float = Field(3600.0, gt=0)
    max_inflight_requests: int = 64
    # The front end's threads run this much nicer than the model worker. 0, the same priority:
    # the model's batches are the front end's output, and at nice 10 it delivered them late
    # while both lanes computed (smaller passes, a core idle; 1.04-1.07x less at concurrency
    # 32 and a fifth less goodput under 10x overload; docs/limits.md).
    frontend_nice: int = 0
    # tokenize-dataset's decoding threads, which read ahead of the model and only fill what
    # its threads leave of the cores (nice 10 measured faster than 0 or 4; docs/bulk.md).
    bulk_decode_nice: int = 10

    # Limits (also shown in /info).
    max_upload_bytes: int = 64 * 2**20
    max_request_bytes: int = 256 * 2**20
    max_files: int = 16
    max_pixels: int = 4096 * 4096
    max_side: int = 512
    min_side: int = 16
    max_frames: int = 36_000  # video frames after sampling; streamed in 16-frame tiles (10 min at 60 fps)
    max_duration_s: float = 600.0
    max_vertices: int = 2_000_000
    max_faces: int = 4_000_000
    # Model tokens (voxels for 3D) per item, from declared sizes. Images and video tiles stay far
    # under it at the default max_side (1,024 and 4,096); 3D assets do not: a box, a sphere or a
    # cylinder fills 19,500-20,700 voxels of the grid (docs/media.md).
    max_item_tokens: int = 32768
    max_aspect: float = 32.0
    max_inflated_bytes: int = 64 * 2**20  # archives (zip meshes, npz volumes) after inflating
    # A video's decoding work in source pixels (a frame dropped by sampling counts an eighth),
    # and a /decode video's output canvas (docs/media.md)
    max_video_pixels: int = Field(10**10, ge=1)
    max_json_bytes: int = 32 * 2**20
    # JSON and token (/decode) bodies are held in memory while they are answered, about 3x their
    # size at the peak (the bytes, the parsed form, the arrays): their declared sizes together,
    # over every request in flight, stay within this (429 beyond; docs/limits.md)
    max_json_inflight_bytes: int = Field(128 * 2**20, ge=1)
    max_json_depth: int = 32

    # Deadlines (seconds): a request never lives past body + request timeouts.
    body_timeout_s: float = 60.0  # the whole request body
    body_idle_timeout_s: float = 15.0  # between two chunks of the body
    fetch_timeout_s: float = 20.0  # each URL input, in total
    liveness_failures: int = 3  # consecutive failed worker starts before /healthz fails

    # Jobs (POST /jobs/{op}): records and results on disk, kept for a while, capped in size.
    jobs_dir: str = str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "atoken" / "jobs")
    job_ttl_s: float = 86400.0
    jobs_max_bytes: int = 2 * 2**30
    jobs_concurrency: int = 1  # jobs running at once (each one's tiles share the queue with requests)
    jobs_max_queued: int = 64

    # Security.
    api_keys: str = ""  # comma-separated
    api_key_file: str | None = None  # one key per line (e.g. a mounted Kubernetes secret)
    allow_url_fetch: bool = False
    url_allowlist: str = ""  # comma-separated host names

    @field_validator("worker")
    @classmethod
    def _worker(cls, v: str) -> str:
        if v not in ("process", "thread", "triton"):
            raise ValueError("worker must be process, thread or triton")
        return v

    @model_validator(mode="after")
    def _triton_needs_its_url(self) -> "Settings":
        # Refused at start-up, not by a worker retrying forever every 2 s behind a failing /healthz.
        if self.worker == "triton" and not self.triton_url:
            raise ValueError("ATOKEN_WORKER=triton needs ATOKEN_TRITON_URL (host:port of a running tritonserver)")
        return self

    @field_validator("max_batch_tokens")
    @classmethod
    def _batch_tokens(cls, v: int | None, info) -> int:
        if v is not None:
            return v
        return 8192 if str(info.data.get("device", "cpu")).startswith("cuda") else 2048

    @cached_property
    def keys(self) -> tuple[str, ...]:
        keys = [k.strip() for k in self.api_keys.split(",") if k.strip()]
        if self.api_key_file:
            keys += [ln.strip() for ln in Path(self.api_key_file).read_text().splitlines() if ln.strip()]
        return tuple(keys)

    @property
    def allowlist(self) -> tuple[str, ...]:
        return tuple(h.strip().lower() for h in self.url_allowlist.split(",") if h.strip())

    @property
    def limits(self) -> MediaLimits:
        return MediaLimits(max_bytes=self.max_upload_bytes, max_pixels=self.max_pixels, max_side=self.max_side,
                           min_side=self.min_side, max_frames=self.max_frames, max_duration_s=self.max_duration_s,
                           max_vertices=self.max_vertices, max_faces=self.max_faces,
                           max_voxels=self.max_item_tokens, max_tokens=self.max_item_tokens,
                           max_aspect=self.max_aspect, max_inflated_bytes=self.max_inflated_bytes,
                           max_video_pixels=self.max_video_pixels)

    @property
    def jobs(self) -> JobsConfig:
        return JobsConfig(Path(self.jobs_dir), self.job_ttl_s, self.jobs_max_bytes, self.jobs_concurrency,
                          self.jobs_max_queued)

    @property
    def batching(self) -> BatchingConfig:
        return BatchingConfig(self.max_batch_tokens, self.max_wait_ms, self.max_queue_jobs, self.max_queue_tokens)

    @property
    def model_spec(self) -> ModelSpec:
        return ModelSpec(self.checkpoint, self.config, self.variant, self.gs_checkpoint, self.gs_config, self.dtype,
                         self.device, self.threads, self.discrete_checkpoint, self.discrete_config, self.lanes)

    def without_deadlines(self) -> "Settings":
        """These settings for work no request deadline bounds (POST /jobs/{op}, tokenize-dataset,
        atoken decode): the video budget, sized to a request's time limit, is at least
        max_frames x max_pixels, so there it only stops a stream holding more than its header
        declares (a job's tiles each keep their deadline, and jobs run one at a time)."""
        return self.model_copy(update={"max_video_pixels": max(self.max_video_pixels,
                                                               self.max_frames * self.max_pixels)})

    def public_limits(self) -> dict:
        return {k: getattr(self, k) for k in (
            "max_upload_bytes", "max_request_bytes", "max_files", "max_pixels", "max_side", "min_side",
            "max_frames", "max_duration_s", "max_vertices", "max_faces", "max_item_tokens", "max_aspect",
            "max_inflated_bytes", "max_json_bytes", "max_json_depth", "max_batch_tokens", "max_queue_jobs",
            "max_queue_tokens", "request_timeout_s", "job_timeout_s", "body_timeout_s", "body_idle_timeout_s", "fetch_timeout_s",
            "max_video_pixels", "max_json_inflight_bytes")}
