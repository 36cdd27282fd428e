"""Run a batch of jobs on one model: one packed encoder pass for every job that needs the
encoder, one packed decoder pass for every job that needs the decoder. A job whose input
breaks the batch is retried alone so that it fails alone."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from model.api import ATokenizer, Tokens
from model.autoencoder import EncoderOutput
from model.cuda_graphs import GraphCaptureError, graphed_encoder
from model.errors import ATokenError, UnsupportedError
from model.gaussians import Gaussians
from model.layers.attention import PoolState
from model.sparse import SparseBatch, cat

from .jobs import DECODER_OPS, ENCODER_OPS, FRAME_VALUES, Job, JobResult, packed_input, reconstruction_pixels

log = logging.getLogger("atoken.worker")

GAUSSIAN_FIELDS = ("xyz_raw", "features_dc", "scaling_raw", "opacity_raw", "rotation_raw")


def gaussians_to_dict(g: Gaussians) -> dict:
    out = {k: getattr(g, k) for k in GAUSSIAN_FIELDS}
    out.update(scaling_bias=g.scaling_bias, opacity_bias=g.opacity_bias, filter_3d=g.filter_3d)
    return out


def split_by_cost(jobs: list[Job], n: int) -> list[list[Job]]:
    """At most n contiguous, non-empty groups of jobs of near-equal total cost."""
    return [[jobs[i] for i in group] for group in split_weights([j.cost for j in jobs], n)]


def split_weights(weights: list[int], n: int) -> list[list[int]]:
    """Indices 0..len-1 cut into at most n contiguous, non-empty groups of near-equal weight."""
    n = max(1, min(n, len(weights)))
    total = sum(weights)
    groups: list[list[int]] = []
    current: list[int] = []
    acc = 0
    for i, weight in enumerate(weights):
        current.append(i)
        acc += weight
        left = n - len(groups) - 1  # groups still to open after this one
        if left > 0 and (acc * n >= total * (len(groups) + 1) or len(weights) - i - 1 == left):
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


def chunks_by_cost(jobs: list[Job], cap: int) -> list[list[Job]]:
    """Jobs in order, cut into consecutive chunks of at most `cap` total cost (a job costlier
    than the cap alone), the way the scheduler forms batches."""
    chunks: list[list[Job]] = []
    cost = 0
    for job in jobs:
        if not chunks or (chunks[-1] and cost + job.cost > cap):
            chunks.append([])
            cost = 0
        chunks[-1].append(job)
        cost += job.cost
    return chunks


def _stamped(results: list[JobResult], start: float) -> list[JobResult]:
    elapsed = (time.perf_counter() - start) * 1e3
    for r in results:
        r.compute_ms = elapsed
    return results


class Lanes:
    """Batches side by side on one engine, each on a lane of its own with its share of the
    threads (one each on a CPU: no OpenMP team beside the caller's; docs/performance.md).
    The process worker and Triton's model hand batches here; `submit` waits for a free lane."""

    def __init__(self, engine: "Engine", lanes: int):
        self.engine, self.lanes = engine, lanes
        self.threads = max(1, engine.threads // lanes)
        self._pool = ThreadPoolExecutor(lanes, thread_name_prefix="atoken-lane")
        self._free = threading.Semaphore(lanes)
        self._lock = threading.Lock()
        self._running = 0  # counted from submission: a batch waiting for its lane is not idle time

    def free(self) -> int:
        with self._lock:
            return self.lanes - self._running

    def idle(self) -> bool:
        return self.free() == self.lanes

    def run(self, jobs: list[Job]) -> list[JobResult]:
        """One pass on the calling lane."""
        return self.engine.run_lane(jobs, self.threads)

    def submit(self, fn: Callable[..., Callable[[], None] | None], *args) -> None:
        """fn(*args) on the next free lane, which it runs its passes on (`run`); fn answers
        for its own errors: nothing it raises is seen. What fn returns, if anything, is called
        once the lane counts as free again: its answer, so that a caller who sends the next batch
        on reading it finds the lane free (a lone job then runs on every thread)."""
        self.reserve()
        self.start(fn, *args)

    def reserve(self) -> None:
        """Wait for a free lane and hold it for the next `start`."""
        self._free.acquire()
        with self._lock:
            self._running += 1

    def start(self, fn: Callable[..., None], *args) -> None:
        """fn(*args) on the lane `reserve` held (see `submit`)."""
        self._pool.submit(self._on_lane, fn, args)

    def _on_lane(self, fn: Callable[..., Callable[[], None] | None], args: tuple) -> None:
        then = None
        try:
            then = fn(*args)
        finally:
            with self._lock:
                self._running -= 1
            self._free.release()
        if then is not None:
            then()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class LaneQueue:
    """Work waits here for a free lane and is taken when one frees, not before: what arrives
    while every lane computes joins the next pass instead of waiting in small passes of its
    own (the process worker gets this from its front end, which forms a batch only once a lane
    is free; Triton's model gets requests from Triton's batcher whenever they come).

    `put` adds items with their costs and returns at once, unless `limit` cost is queued already
    (then it waits: the caller's own queue holds the rest). A free lane takes whole items in
    order, about 1/ways of what is queued, ways being the free lanes with it (a burst on idle
    lanes runs on all), at most `cap`, at least one item; `run(items)` runs them on that lane
    and answers for its own errors."""

    def __init__(self, lanes: Lanes, run: Callable[[list], None], cap: int, limit: int):
        self.lanes, self.run, self.cap, self.limit = lanes, run, cap, limit
        self._items: deque[tuple[object, int]] = deque()
        self._cost = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._feed, name="atoken-lanefeed", daemon=True)
        self._thread.start()

    def empty(self) -> bool:
        with self._cond:
            return not self._items

    def put(self, items: list, costs: list[int]) -> None:
        with self._cond:
            while self._cost >= self.limit and not self._closed:
                self._cond.wait()
            self._items.extend(zip(items, costs))
            self._cost += sum(costs)
            self._cond.notify_all()

    def _feed(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                if not self._items:
                    return  # closed, and everything put was taken
            self.lanes.reserve()
            with self._cond:  # only this thread takes items: some are still there
                share = min(self.cap, -(-self._cost // (self.lanes.free() + 1)))
                taken, cost = [], 0
                while self._items and (not taken or cost + self._items[0][1] <= share):
                    item, c = self._items.popleft()
                    taken.append(item)
                    cost += c
                self._cost -= cost
                self._cond.notify_all()
            self.lanes.start(self.run, taken)

    def close(self) -> None:
        """Every item put is handed to a lane; then the feeding thread ends (`Lanes.close`
        waits for them to finish)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()


class Engine:
    """Runs jobs on the tokenizer of their token mode (one model may serve both).

    On a CPU a batch is cut into `lanes` parts by cost, each run on its own thread with one
    core's worth of intra-op threads: this CPU's matrix units stay busier with independent
    single-threaded streams than with one stream split across cores (61 vs 42 images/s at
    batch 8 on 2 cores; docs/performance.md). A batch of one job keeps every thread."""

    def __init__(self, tokenizers: dict[str, ATokenizer], lanes: int = 1, threads: int = 0):
        """tokenizers: token mode -> model, as `loader.load_tokenizers` builds it."""
        self.tokenizers = tokenizers
        # On a GPU with flash-attn, encoder passes replay CUDA graphs (ATOKEN_CUDA_GRAPHS).
        self.graphed = {id(t): graphed_encoder(t.model) for t in tokenizers.values()}
        self._graph_lock = threading.Lock()  # a graph's buffers are shared: one replay at a time (lanes)
        self.tok = tokenizers["continuous"]
        self.threads = threads or torch.get_num_threads()
        self.lanes = max(1, lanes)
        self._lane_pool = ThreadPoolExecutor(self.lanes - 1, thread_name_prefix="atoken-lane") if self.lanes > 1 else None

    def run(self, jobs: list[Job]) -> list[JobResult]:
        if not jobs:
            return []
        start = time.perf_counter()
        groups = split_by_cost(jobs, self.lanes)
        per_lane = max(1, self.threads // len(groups))
        rest = [self._lane_pool.submit(self._run_group, g, per_lane) for g in groups[1:]] if self._lane_pool else []
        results = self._run_group(groups[0], per_lane)
        for future in rest:
            results += future.result()
        return _stamped(results, start)

    def run_lane(self, jobs: list[Job], threads: int) -> list[JobResult]:
        """The whole batch as one part on the calling thread, with `threads` intra-op threads:
        for callers that run several batches side by side (`Lanes`)."""
        start = time.perf_counter()
        return _stamped(self._run_group(jobs, threads), start)

    def _run_group(self, jobs: list[Job], threads: int) -> list[JobResult]:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)  # per thread for OpenMP: each lane sets its own
        try:
            results = self._run_packed(jobs)
        except Exception:  # noqa: BLE001 - isolate: one bad job must not fail its batch
            results = [self._run_alone(job) for job in jobs]
        for r in results:
            r.extra["threads"] = threads
        return results

    def _run_alone(self, job: Job) -> JobResult:
        try:
            return self._run_packed([job])[0]
        except ATokenError as exc:
            return JobResult(job.id, error=(type(exc).__name__, str(exc)))
        except Exception as exc:  # noqa: BLE001
            return JobResult(job.id, error=("InternalError", f"{type(exc).__name__}: {exc}"))

    def _run_packed(self, jobs: list[Job]) -> list[JobResult]:
        results = {job.id: JobResult(job.id) for job in jobs}
        missing = {j.model_mode for j in jobs} - set(self.tokenizers)
        if missing:
            raise UnsupportedError(f"no tokenizer serves {sorted(missing)} tokens here")
        # One packed pass per model: when one model serves both modes, all jobs share it.
        for tok in {id(t): t for t in self.tokenizers.values()}.values():
            group = [j for j in jobs if self.tokenizers[j.model_mode] is tok]
            if not group:
                continue
            pool_jobs = [j for j in group if j.op == "pool"]
            if pool_jobs:
                self._pool(tok, pool_jobs, results)
            enc_jobs = [j for j in group if j.op in ENCODER_OPS]
            decode_inputs: dict[int, Tokens] = {j.id: j.tokens for j in group if j.op == "decode"}
            if enc_jobs:
                self._encode(tok, enc_jobs, results, decode_inputs)
            dec_jobs = [j for j in group if j.op in DECODER_OPS]
            if dec_jobs:
                self._decode(tok, dec_jobs, results, decode_inputs)
        return [results[j.id] for j in jobs]

    def _encode(self, tok: ATokenizer, jobs: list[Job], results: dict[int, JobResult],
                decode_inputs: dict[int, Tokens]) -> None:
        packed = packed_input([j.batch for j in jobs])
        model = tok.model
        batch = SparseBatch(packed.feats.to(tok.device), packed.coords.to(tok.device), packed.kinds)
        with torch.inference_mode():
            enc = self._graphed_encode(tok, batch, jobs)
            if enc is None:
                enc = model.encode(batch, pool=any(j.pools for j in jobs))  # tokens alone skip the pooling head
            mean = enc.mean
            discrete = [j.mode == "discrete" for j in jobs]
            indices = model.quantize(mean)[1] if any(discrete) else None
        rows = packed.coords[:, 0]
        for b, job in enumerate(jobs):
            mask = (rows == b).to(mean.device)
            r = results[job.id]
            coords = job.batch.coords.to(torch.int32)
            if job.op == "embed" and job.partial:
                r.pool_state = enc.pool_state.select(b).to("cpu")
                continue
            if job.op == "embed":
                r.embedding = enc.embedding[b].float().cpu()
                if job.dense:
                    r.features = enc.features[mask].float().cpu()
                continue
            if job.partial:  # a tile of a longer video: its part of the embedding, to merge
                r.pool_state = enc.pool_state.select(b).to("cpu")
            if job.embedding:
                r.embedding = enc.embedding[b].float().cpu()
            if job.op == "reconstruct":
                # An intermediate: decoded here, never sent back (at 256x256, latents and log-
                # variances are half the bytes of the pixels that are). Kept on the device.
                decode_inputs[job.id] = (Tokens(coords, job.batch.kinds, indices=indices[mask]) if discrete[b]
                                         else Tokens(coords, job.batch.kinds, latents=mean[mask].float()))
            elif discrete[b]:
                r.tokens = Tokens(coords, job.batch.kinds, indices=indices[mask].cpu())
            else:
                r.tokens = Tokens(coords, job.batch.kinds, latents=mean[mask].float().cpu(),
                                  logvar=enc.logvar[mask].float().cpu())

    def _graphed_encode(self, tok: ATokenizer, batch: SparseBatch, jobs: list[Job]) -> EncoderOutput | None:
        """The pass through the tokenizer's captured graphs, or None where it runs eagerly: no
        graphs, a batch larger than every bucket, or pieces of long videos (their pooling
        states are not in the graph). A capture that fails turns the graphs off for good."""
        graphed = self.graphed.get(id(tok))
        if graphed is None or not graphed.fits(batch) or any(j.partial for j in jobs):
            return None
        try:
            with self._graph_lock:
                return graphed.encode(batch)
        except GraphCaptureError as exc:
            log.warning("%s; encoder passes run eagerly from now on", exc)
            self.graphed[id(tok)] = None
            return None

    def _pool(self, tok: ATokenizer, jobs: list[Job], results: dict[int, JobResult]) -> None:
        states = [j.pool_state for j in jobs]
        merged = PoolState(*(torch.cat([getattr(s, f) for s in states]) for f in ("peak", "total", "weighted")))
        with torch.inference_mode():
            _, embedding = tok.model.pool(merged)
        for b, job in enumerate(jobs):
            results[job.id].embedding = embedding[b].float().cpu()

    def _decode(self, tok: ATokenizer, jobs: list[Job], results: dict[int, JobResult],
                decode_inputs: dict[int, Tokens]) -> None:
        latent_batches = [tok.latent_batch(decode_inputs[j.id]) for j in jobs]
        packed = cat(latent_batches)
        # Images shown as pixels keep only their first frame, 3D items their voxels' features:
        # where every job does, the decoder makes no more.
        first_frame = all(j.tubelet_width == FRAME_VALUES for j in jobs)
        with torch.inference_mode():
            rec = tok.model.decode(packed, columns=FRAME_VALUES if first_frame else None).float().cpu()
        # cat keeps each job's rows together and in order: views, not masked copies.
        for job, tubelets in zip(jobs, rec.split([b.num_tokens for b in latent_batches])):
            r = results[job.id]
            r.tubelets = tubelets[:, :job.tubelet_width]
            kind = decode_inputs[job.id].kinds[0]
            if job.gaussians and kind == "3D":
                item = SparseBatch(r.tubelets, decode_inputs[job.id].coords, ("3D",))
                g = tok.decode_gaussians(item)[0]
                r.gaussians = gaussians_to_dict(g)
            elif job.pixels_width:
                r.tubelets = reconstruction_pixels(r.tubelets, kind)
