"""Where batches run: in this process (a thread owns the model) or in a child process that
can die and be restarted without taking the front end down."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import asdict
from multiprocessing.connection import wait as mp_wait
from typing import Callable, Protocol

import torch

from model.api import ATokenizer
from model.patchify import frames_to_sparse

from . import transport
from .engine import Engine, Lanes
from .jobs import Job, JobResult, WorkPrice, attention_crossover, linear_flops, pixel_patches
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


def ready_info(engine: Engine, tokenizers: dict[str, ATokenizer], work: dict | None = None, timed: bool = True) -> dict:
    """A started worker's last checks: the canary round trip, then timed passes. What /info
    shows, with the speed measured (`work`, see `calibrate`). Given `work`, the speed an earlier
    worker of the same front end measured, the passes are not timed again: a worker restarted
    after a crash serves the same model on the same machine, and readiness comes back that
    much sooner (2.3 s after a kill instead of 4.5 on an AVX2 CPU). Not `timed`, for a caller
    that batches by token count and reads no speed (bulk tokenization, the CLI), there is no
    `work`: 1.5 s less before the first input on an AVX2 CPU."""
    canary(engine)
    info = describe(tokenizers)
    if work is None and timed:
        crossover = attention_crossover(info["encoder"])
        floor = linear_flops(info["decoder"]) / linear_flops(info["encoder"])
        work = calibrate(engine, crossover, floor) | {"attention_crossover": crossover}
    if work is not None:
        info["work"] = work
    return info


CALIBRATION_SIDE = 512  # a 1,024-token image: long enough that a GPU's pass is not all launches
CALIBRATION_PAIRS = 5  # each server start pays: 0.45 s (bf16, AMX) to 1.5 s (float32, AVX2) with the shipped model
CALIBRATION_S = 1.0  # at most this long for the timed passes, once past the first of each op (which count if slower)


def calibrate(engine: Engine, crossover: float, decoder_floor: float = 0.0) -> dict:
    """The worker's speed: `per_s`, `WorkPrice` units a second, from an image tokenized alone on
    every thread, and `decoder_pass`, what a decoder pass costs in encoder passes, from the same
    image reconstructed. Passes of the two ops alternate, after a first of each that makes the
    kernels for its shapes. The worker may start beside other work (a front end starting, a
    probe polling): every thread of a pass waits for the slowest, so the rate is the fastest
    tokenize seen (the scheduler follows every batch after it), and the decoder's share the median
    of each pair's ratio, which a steady load slows alike (the ratio of the fastest of each
    was off by 2x under a readiness probe polling every 50 ms), at least `decoder_floor` (its
    linear layers' FLOPs against the encoder's: under load the median read 0 once)."""
    # Timed as served: uint8 frame patches in, the frame's pixels out, which is also how a 3D
    # asset's voxels travel (768 values a token each way). Float tubelets, full width in and
    # out, would time the projections of three zero frames no image or asset has.
    side = CALIBRATION_SIDE
    pixels = torch.randint(0, 256, (1, side, side, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batch = pixel_patches(pixels.numpy())
    encode, both = Job(0, "tokenize", batch=batch), Job(0, "reconstruct", batch=batch, pixels=True)
    first = (_timed(engine, encode), _timed(engine, both))  # makes the kernels for its shapes
    if sum(first) > CALIBRATION_S:
        # Passes this slow (a large model, or a dtype the CPU emulates: 18 s in all for
        # bfloat16 on an AVX2 CPU) time themselves: making kernels is lost in them, and the
        # scheduler follows every batch after this anyway.
        pairs = [first]
    else:
        pairs = []
        deadline = time.perf_counter() + CALIBRATION_S
        for _ in range(CALIBRATION_PAIRS):
            pairs.append((_timed(engine, encode), _timed(engine, both)))
            if time.perf_counter() > deadline:
                break
    ratios = sorted(b / e - 1 for e, b in pairs)
    return {"per_s": WorkPrice(crossover)(encode) / min(e for e, _ in pairs),
            "decoder_pass": max(ratios[len(ratios) // 2], decoder_floor)}


def _timed(engine: Engine, job: Job) -> float:
    start = time.perf_counter()
    engine.run([job])
    return time.perf_counter() - start


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
    """The model in this process; batches run on the calling thread (the dispatcher's). `timed`:
    whether `start` measures the speed a scheduler reads (see `ready_info`)."""

    def __init__(self, spec: ModelSpec, calibration: dict | None = None, timed: bool = True):
        self.spec, self.timed = spec, timed
        self.calibration = {} if calibration is None else calibration  # as for ProcessBackend
        self.engine: Engine | None = None
        self.info: dict = {}

    def start(self) -> dict:
        tokenizers = load_tokenizers(self.spec)
        self.engine = Engine(tokenizers, self.spec.engine_lanes, self.spec.threads)
        self.info = ready_info(self.engine, tokenizers, self.calibration.get("work"), self.timed)
        if "work" in self.info:
            self.calibration.setdefault("work", self.info["work"])
        return self.info

    def run(self, jobs: list[Job]) -> list[JobResult]:
        return self.engine.run(jobs)

    def alive(self) -> bool:
        return self.engine is not None

    def stop(self) -> None:
        self.engine = None


def _child_main(conn, spec: ModelSpec, arenas: list[tuple[str, str]], work: dict | None = None) -> None:
    # SIGTERM or Ctrl-C sent to the whole process group must not kill a batch half-way: the
    # front end drains its requests, then asks the worker to exit (or closes the pipe).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    slots = [tuple(transport.Arena(path) if path else None for path in pair) for pair in arenas]  # (in, out)
    try:
        tokenizers = load_tokenizers(spec)
        engine = Engine(tokenizers, spec.engine_lanes, spec.threads)
        conn.send_bytes(transport.dumps(("ready", ready_info(engine, tokenizers, work))))
    except Exception as exc:  # noqa: BLE001
        conn.send_bytes(transport.dumps(("failed", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")))
        return
    send_lock = threading.Lock()

    def answer(slot: int, results: list[JobResult]) -> None:
        with send_lock:
            conn.send_bytes(bytes([slot]) + transport.dumps(("results", results), slots[slot][1]))

    if len(slots) == 1:
        while (msg := _receive(conn, slots)) is not None:
            answer(msg[0], engine.run(msg[1]))
        return
    lanes = Lanes(engine, len(slots))

    def or_die(fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException:  # noqa: BLE001 - a batch nobody answers would hang its requests
            traceback.print_exc()
            os._exit(70)  # the front end sees the worker die and fails the batches it held

    def on_lane(slot: int, jobs: list[Job]) -> Callable[[], None]:
        results: list[JobResult] = []
        or_die(lambda: results.extend(lanes.run(jobs)))
        return lambda: or_die(lambda: answer(slot, results))  # sent once the lane counts as free

    # A lone job that finds the worker idle, with nothing behind it, runs on every thread
    # (batch-1 latency). Here, on the main thread, which loaded the model: OpenMP gives each
    # thread that opens a multi-threaded region a team of its own, and with a second team on two
    # cores every parallel op slowed, on both threads (a batch-1 pass 11 instead of 6 ms). Lanes
    # run one thread each: no team. The pipe is read on a thread of its own, so what arrives
    # while a lone job runs goes to a lane at once: read on the main thread, a 24 ms image
    # waited 12.2 s behind a 3D asset's lone pass. The front end holds at most one batch per lane.
    lone: queue.SimpleQueue = queue.SimpleQueue()
    main_busy = threading.Event()

    def read() -> None:
        while (msg := _receive(conn, slots)) is not None:
            if not main_busy.is_set() and lanes.idle() and len(msg[1]) == 1 and not conn.poll(0):
                main_busy.set()
                lone.put(msg)
            else:
                lanes.submit(on_lane, *msg)
        lone.put(None)

    # A reader that dies must take the worker with it: one that reads nothing more looks alive.
    threading.Thread(target=or_die, args=(read,), name="atoken-reader", daemon=True).start()
    while (msg := lone.get()) is not None:
        try:
            results = engine.run(msg[1])
        finally:
            main_busy.clear()  # before answering: the caller's next lone job runs here too
        answer(msg[0], results)
    lanes.close()


def _receive(conn, slots: list) -> tuple[int, list[Job]] | None:
    """The next batch and the slot it came in, or None when the front end asks to stop or is gone."""
    try:
        data = conn.recv_bytes()
    except EOFError:
        return None
    slot = data[0]
    jobs = transport.loads(memoryview(data)[1:], slots[slot][0])
    return None if jobs is None else (slot, jobs)


def _running(proc: mp.process.BaseProcess) -> bool:
    """Whether the process still runs, asked without reaping it: `is_alive()` calls waitpid,
    and of two threads asking at once one can be told ECHILD and take a dead worker for alive."""
    return not mp_wait([proc.sentinel], 0)


GOMP_SPINCOUNT = 20000


class ProcessBackend:
    """The model in a child process (spawned, so no state leaks from the front end).

    With `slots` > 1 (one per lane on a CPU) that many batches are in flight at once, each with
    its own pair of arenas, and the worker runs them side by side, one lane each: a lane that
    finishes takes the next batch while the other still runs, instead of every batch being cut
    across all lanes. Lanes then run batches twice the size at the same load, and a pass costs
    less per image the more images it holds (docs/performance.md)."""

    def __init__(self, spec: ModelSpec, start_timeout: float = 300.0, slots: int = 1,
                 calibration: dict | None = None):
        self.spec = spec
        # Shared by the workers one front end starts in turn: the first keeps the speed it
        # measured here ("work"), and a restarted one reuses it (see `ready_info`).
        self.calibration = {} if calibration is None else calibration
        self.start_timeout = start_timeout
        self.max_inflight_batches = max(1, slots)
        self.share_slots = True  # the scheduler splits a burst between free lanes
        self.proc: mp.process.BaseProcess | None = None
        self.conn = None
        self.info: dict = {}
        self._send_lock = threading.Lock()
        self._arenas: list[tuple[transport.Arena, transport.Arena]] = []  # (to the worker, back)
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._waiting: dict[int, Future] = {}
        self._reader: threading.Thread | None = None
        self._abort_reason: str | None = None  # why `abort` killed it

    def start(self) -> dict:
        ctx = mp.get_context("spawn")
        # OpenMP threads spin a short while between the operations of a batch, then sleep:
        # PASSIVE (sleep at once) made batch-1 requests 10-25% slower, libgomp's default spin
        # (300000) took CPU the front end and clients needed under load (16.8 vs 21.7 req/s),
        # 20000 spins kept both (docs/performance.md). The child reads this when torch loads.
        os.environ.setdefault("GOMP_SPINCOUNT", str(GOMP_SPINCOUNT))
        parent, child = ctx.Pipe()
        arenas = self._make_arenas()
        try:
            paths = [tuple(a.path if a else None for a in pair) for pair in arenas]
            proc = ctx.Process(target=_child_main, args=(child, self.spec, paths, self.calibration.get("work")),
                               name="atoken-worker", daemon=True)
            proc.start()
            child.close()
            status, payload = self._await_ready(proc, parent)
            if status != "ready":
                proc.join(5)
                raise RuntimeError(f"worker failed to load the model: {payload}")
        except BaseException:
            self._close(arenas)
            raise
        for pair in arenas:  # both sides have mapped them by now
            for arena in pair:
                if arena:
                    arena.forget_name()
        self.proc, self.conn, self.info, self._arenas = proc, parent, payload, arenas
        self.calibration.setdefault("work", payload["work"])
        self._free = queue.SimpleQueue()
        for slot in range(len(arenas)):
            self._free.put(slot)
        if len(arenas) > 1:
            self._reader = threading.Thread(target=self._read_results, name="atoken-results", daemon=True)
            self._reader.start()
        return payload

    def _await_ready(self, proc, conn) -> tuple[str, object]:
        deadline = time.monotonic() + self.start_timeout
        while not conn.poll(0.1):
            if not proc.is_alive():
                raise WorkerDied(f"worker exited during start-up (exit code {proc.exitcode})")
            if time.monotonic() > deadline:
                proc.kill()
                raise WorkerDied(f"worker not ready after {self.start_timeout:.0f} s")
        try:
            return transport.loads(conn.recv_bytes())
        except EOFError:  # it closed the pipe without a word: it died while starting
            proc.join(5)
            raise WorkerDied(f"worker exited during start-up (exit code {proc.exitcode})") from None

    def _make_arenas(self) -> list[tuple]:
        """An arena each way per slot, their memory reserved now; where shared memory has no room
        for them, none: every message then travels through the pipe (slower, never a crash)."""
        freed = transport.reclaim_stale()
        if freed:
            log.warning("freed %d shared-memory arenas that front ends which died while starting had left", len(freed))
        size = transport.ARENA_BYTES // self.max_inflight_batches
        made: list[transport.Arena] = []
        try:
            for _ in range(2 * self.max_inflight_batches):
                made.append(transport.Arena(size=size))
        except transport.ArenaUnavailable as exc:
            self._close([made])
            log.warning("%s; jobs and results go through the pipe instead (give the container a larger /dev/shm)", exc)
            return [(None, None)] * self.max_inflight_batches
        return list(zip(made[::2], made[1::2]))

    @staticmethod
    def _close(arenas: list[tuple]) -> None:
        for pair in arenas:
            for arena in pair:
                if arena:
                    arena.close()

    def _close_arenas(self) -> None:
        self._close(self._arenas)
        self._arenas = []

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and _running(self.proc)

    def abort(self, reason: str) -> None:
        """Kill a worker that has hung (the scheduler's watchdog): the batches waiting on it fail
        with `reason`, and the scheduler starts another."""
        proc = self.proc
        if proc is not None and _running(proc):
            self._abort_reason = reason
            proc.kill()

    def _died(self, proc: mp.process.BaseProcess) -> WorkerDied:
        return WorkerDied(self._abort_reason or f"worker exited mid-batch (exit code {proc.exitcode})")

    def run(self, jobs: list[Job]) -> list[JobResult]:
        if not self.alive():
            raise WorkerDied("worker is not running")
        slot = self._free.get()  # the scheduler takes a slot first, so this never waits there
        try:
            if self.max_inflight_batches == 1:
                return self._run_in_turn(slot, jobs)
            return self._run_beside(slot, jobs)
        finally:
            self._free.put(slot)

    def _send(self, slot: int, jobs: list[Job]) -> None:
        with self._send_lock:
            self.conn.send_bytes(bytes([slot]) + transport.dumps(jobs, self._arenas[slot][0]))

    def _run_in_turn(self, slot: int, jobs: list[Job]) -> list[JobResult]:
        """One batch at a time: the caller's thread waits on the pipe itself (no hand-over)."""
        try:
            self._send(slot, jobs)
            while not self.conn.poll(0.05):
                if not _running(self.proc):
                    raise self._died(self.proc)
            data = self.conn.recv_bytes()
            status, payload = transport.loads(memoryview(data)[1:], self._arenas[slot][1])
        except (EOFError, BrokenPipeError, ConnectionResetError, OSError) as exc:
            raise WorkerDied(f"lost the worker: {exc}") from None
        return payload

    def _run_beside(self, slot: int, jobs: list[Job]) -> list[JobResult]:
        answer: Future = Future()
        self._waiting[slot] = answer
        try:
            self._send(slot, jobs)
        except (BrokenPipeError, ConnectionResetError, OSError) as exc:
            self._waiting.pop(slot, None)
            raise WorkerDied(f"lost the worker: {exc}") from None
        while True:
            try:
                return answer.result(timeout=0.5)
            except TimeoutError:
                if not self._reader.is_alive() and not answer.done():  # it died before this batch was sent
                    raise WorkerDied("lost the worker") from None

    def _read_results(self) -> None:
        """Hands each answer to the batch waiting on its slot; when the worker dies, fails them all."""
        conn, proc, arenas = self.conn, self.proc, self._arenas
        try:
            while True:
                if not conn.poll(0.05):
                    if not _running(proc):
                        raise self._died(proc)
                    continue
                data = conn.recv_bytes()
                slot = data[0]
                _, payload = transport.loads(memoryview(data)[1:], arenas[slot][1])
                self._waiting.pop(slot).set_result(payload)
        except (EOFError, OSError, WorkerDied) as exc:
            error = exc if isinstance(exc, WorkerDied) else WorkerDied(f"lost the worker: {exc}")
            for slot in list(self._waiting):
                waiter = self._waiting.pop(slot, None)
                if waiter is not None:
                    waiter.set_exception(error)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            self._send(0, None)
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.proc = None
        self._close_arenas()
