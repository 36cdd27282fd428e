"""Where batches run: in this process (a thread owns the model) or in a child process that
can die and be restarted without taking the front end down."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from dataclasses import asdict
from typing import Protocol

import torch

from model.api import ATokenizer
from model.patchify import frames_to_sparse

from . import transport
from .engine import Engine
from .jobs import Job, JobResult
from .loader import ModelSpec, load_tokenizers

log = logging.getLogger("atoken.worker")


class WorkerDied(RuntimeError):
    """The worker process exited while it held a batch."""


class Backend(Protocol):
    info: dict

    def start(self) -> dict: ...

    def run(self, jobs: list[Job]) -> list[JobResult]: ...

    def alive(self) -> bool: ...

    def stop(self) -> None: ...


def describe(tokenizers: dict[str, ATokenizer]) -> dict:
    """What /info shows: the continuous model, and under `modes` each token mode's model."""
    tokenizer = tokenizers["continuous"]
    discrete = tokenizers.get("discrete")
    info = asdict(tokenizer.info)
    cfg = tokenizer.config
    quantizer = discrete.config.quantizer if discrete is not None else None
    info.update(
        latent_channels=cfg.latent_channels, embed_dim=cfg.embed_dim, max_tokens=cfg.max_tokens,
        discrete=discrete is not None, gaussians=tokenizer.gs_decoder is not None,
        codebook_size=quantizer.codebook_size if quantizer else None,
        num_codebooks=quantizer.num_codebooks if quantizer else None,
        encoder=asdict(cfg.encoder), decoder=asdict(cfg.decoder),
        modes={mode: {"variant": tok.info.variant, "sha256": tok.info.sha256, "checkpoint": tok.info.checkpoint,
                      "trained": tok.info.trained, "card": tok.info.card}
               for mode, tok in tokenizers.items()},
    )
    return info


def canary(engine: Engine) -> None:
    """Warm up and prove a round trip works: a 32x32 gradient through encode and decode."""
    ramp = torch.linspace(-1, 1, 32)
    image = torch.stack([ramp[:, None].expand(32, 32), ramp[None, :].expand(32, 32), -ramp[:, None].expand(32, 32)], -1)
    batch, _ = frames_to_sparse([image])
    jobs = [Job(0, "reconstruct", batch=batch), Job(1, "embed", batch=batch)]
    if "discrete" in engine.tokenizers:
        jobs.append(Job(2, "reconstruct", mode="discrete", batch=batch))
    for r in engine.run(jobs):
        if r.error or (r.id != 1 and (r.tubelets is None or not torch.isfinite(r.tubelets).all())):
            raise RuntimeError(f"canary round trip failed: {r.error}")


class LocalBackend:
    """The model in this process; batches run on the calling thread (the dispatcher's)."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.engine: Engine | None = None
        self.info: dict = {}

    def start(self) -> dict:
        tokenizers = load_tokenizers(self.spec)
        self.engine = Engine(tokenizers, self.spec.engine_lanes, self.spec.threads)
        canary(self.engine)
        self.info = describe(tokenizers)
        return self.info

    def run(self, jobs: list[Job]) -> list[JobResult]:
        return self.engine.run(jobs)

    def alive(self) -> bool:
        return self.engine is not None

    def stop(self) -> None:
        self.engine = None


def _child_main(conn, spec: ModelSpec, arenas: tuple[str, str]) -> None:
    # SIGTERM or Ctrl-C sent to the whole process group must not kill a batch half-way: the
    # front end drains its requests, then asks the worker to exit (or closes the pipe).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inbox, outbox = (transport.Arena(path) for path in arenas)
    try:
        tokenizers = load_tokenizers(spec)
        engine = Engine(tokenizers, spec.engine_lanes, spec.threads)
        canary(engine)
        conn.send_bytes(transport.dumps(("ready", describe(tokenizers))))
    except Exception as exc:  # noqa: BLE001
        conn.send_bytes(transport.dumps(("failed", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")))
        return
    while True:
        try:
            msg = transport.loads(conn.recv_bytes(), inbox)
        except EOFError:
            return
        if msg is None:
            return
        conn.send_bytes(transport.dumps(("results", engine.run(msg)), outbox))


GOMP_SPINCOUNT = 20000


class ProcessBackend:
    """The model in a child process (spawned, so no state leaks from the front end)."""

    def __init__(self, spec: ModelSpec, start_timeout: float = 300.0):
        self.spec = spec
        self.start_timeout = start_timeout
        self.proc: mp.process.BaseProcess | None = None
        self.conn = None
        self.info: dict = {}
        self._lock = threading.Lock()
        self.outbox: transport.Arena | None = None
        self.inbox: transport.Arena | None = None

    def start(self) -> dict:
        ctx = mp.get_context("spawn")
        # OpenMP threads spin a short while between the operations of a batch, then sleep:
        # PASSIVE (sleep at once) made batch-1 requests 10-25% slower, libgomp's default spin
        # (300000) took CPU the front end and clients needed under load (16.8 vs 21.7 req/s),
        # 20000 spins kept both (docs/performance.md). The child reads this when torch loads.
        os.environ.setdefault("GOMP_SPINCOUNT", str(GOMP_SPINCOUNT))
        parent, child = ctx.Pipe()
        outbox, inbox = transport.Arena(), transport.Arena()  # jobs to the worker, results back
        try:
            proc = ctx.Process(target=_child_main, args=(child, self.spec, (outbox.path, inbox.path)),
                               name="atoken-worker", daemon=True)
            proc.start()
            child.close()
            status, payload = self._await_ready(proc, parent)
            if status != "ready":
                proc.join(5)
                raise RuntimeError(f"worker failed to load the model: {payload}")
        except BaseException:
            outbox.close()
            inbox.close()
            raise
        for arena in (outbox, inbox):  # both sides have mapped them by now
            arena.forget_name()
        self.proc, self.conn, self.info = proc, parent, payload
        self.outbox, self.inbox = outbox, inbox
        return payload

    def _await_ready(self, proc, conn) -> tuple[str, object]:
        deadline = time.monotonic() + self.start_timeout
        while not conn.poll(0.1):
            if not proc.is_alive():
                raise WorkerDied(f"worker exited during start-up (exit code {proc.exitcode})")
            if time.monotonic() > deadline:
                proc.kill()
                raise WorkerDied(f"worker not ready after {self.start_timeout:.0f} s")
        return transport.loads(conn.recv_bytes())

    def _close_arenas(self) -> None:
        for arena in (self.outbox, self.inbox):
            if arena is not None:
                arena.close()
        self.outbox = self.inbox = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    def run(self, jobs: list[Job]) -> list[JobResult]:
        if not self.alive():
            raise WorkerDied("worker is not running")
        with self._lock:  # one batch at a time: each arena holds one message
            try:
                self.conn.send_bytes(transport.dumps(jobs, self.outbox))
                while not self.conn.poll(0.05):
                    if not self.proc.is_alive():
                        raise WorkerDied(f"worker exited mid-batch (exit code {self.proc.exitcode})")
                status, payload = transport.loads(self.conn.recv_bytes(), self.inbox)
            except (EOFError, BrokenPipeError, ConnectionResetError, OSError) as exc:
                raise WorkerDied(f"lost the worker: {exc}") from None
        return payload

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            self.conn.send_bytes(transport.dumps(None))
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.proc = None
        self._close_arenas()
