"""Videos of any length, tile by tile, in constant memory.

A video is decoded one 16-frame tile at a time (the official encoder's temporal unit: tiles
never attend to each other, so a tile sent alone gives exactly its part of the whole clip),
each tile is its own job in the scheduler's queue (so other requests are served between two
tiles), and each result is written out (frames muxed into a file, tokens appended to a file,
pooling states merged) before the next tile is decoded. At most LOOKAHEAD tiles are decoded
ahead of the one being written."""

from __future__ import annotations

import asyncio
import math
import os
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable, TypeVar

import numpy as np
import torch

from model.api import Tokens
from model.config import TEMPORAL_TILE
from model.layers.attention import PoolState, merge_pool_states
from model.sparse import SparseBatch

from .errors import Overloaded, from_worker
from .media import image as img
from .media import video as vid
from .inputs import VideoSource
from .pipeline import model_size_frames
from .runtime import Runtime, Timing
from .worker.jobs import Job, JobResult, pixel_patches

LOOKAHEAD = 2  # tiles decoded and queued ahead of the one being written
MAX_BACKOFF_S = 1.0  # a full queue delays the next tile; it does not fail a long video
T = TypeVar("T")  # what `in_order`'s caller pairs with each job


@dataclass
class Progress:
    """Tiles done of the total the header promises; `on_change` sees every step (job records)."""

    total: int
    done: int = 0
    unit: str = "tiles"
    started: float = field(default_factory=time.monotonic)
    on_change: Callable[["Progress"], None] | None = None

    def advance(self) -> None:
        self.done += 1
        self.total = max(self.total, self.done)
        if self.on_change:
            self.on_change(self)

    def expect_fewer(self, steps: int) -> None:
        if steps > 0:
            self.total = max(self.done, self.total - steps)
            if self.on_change:
                self.on_change(self)

    @property
    def eta_s(self) -> float | None:
        if not self.done:
            return None
        return (time.monotonic() - self.started) / self.done * max(0, self.total - self.done)


@dataclass
class Tile:
    index: int
    frames: np.ndarray  # uint8 [<= 16, h, w, 3] at the model size, as decoded
    job: Job  # its coords (t from 0 within the tile) order the result's rows
    result: JobResult


Consumer = Callable[[Tile], None]


class TileRun:
    """Drives one video through the scheduler: decode (heavy pool) -> job -> consume (post pool)."""

    def __init__(self, runtime: Runtime, source: VideoSource, make_job: Callable[[SparseBatch], Job],
                 progress: Progress | None = None):
        self.runtime, self.source, self.make_job = runtime, source, make_job
        self.progress = progress or Progress(source.plan.tiles)
        self.queue_ms = self.compute_ms = 0.0
        self.tiles = self.frames = self.tokens = 0

    async def run(self, consume: Consumer) -> None:
        tiles = self.source.tiles()
        count = 0

        async def make() -> tuple[np.ndarray, Job] | None:
            frames = await self.runtime.preprocess_heavy(next, tiles, None)
            return None if frames is None else (frames, self.make_job(pixel_patches(vid.pad_to_tubelets(frames))))

        async def done(frames: np.ndarray, job: Job, result: JobResult) -> None:
            nonlocal count
            self._account(frames, result)
            await self.runtime.postprocess(consume, Tile(count, frames, job, result))
            count += 1
            self.progress.advance()

        try:
            await in_order(self.runtime, make, done)
        finally:
            await self.runtime.preprocess_heavy(tiles.close)  # closes the decoder's container
        # The header's count is an upper bound (a start between frames can promise one more
        # frame, so a tile): what this run did not need comes off the total it may share.
        self.progress.expect_fewer(self.source.plan.tiles - self.tiles)

    def _account(self, frames: np.ndarray, result: JobResult) -> None:
        self.tiles += 1
        self.frames += frames.shape[0]
        self.tokens += math.ceil(frames.shape[0] / vid.TUBELET) * math.prod(self.source.grid)
        self.queue_ms = max(self.queue_ms, result.extra.get("queue_ms", 0.0))
        self.compute_ms += result.compute_ms

    @property
    def timing(self) -> Timing:
        return Timing(self.queue_ms, self.compute_ms, 1)

    @property
    def token_grid(self) -> str:
        rows, cols = self.source.grid
        return f"{math.ceil(self.frames / vid.TUBELET)}x{rows}x{cols}"


async def in_order(runtime: Runtime, make: Callable[[], Awaitable[tuple[T, Job] | None]],
                   done: Callable[[T, Job, JobResult], Awaitable[None]]) -> None:
    """Jobs made one at a time by `make` (None: no more) run through the scheduler LOOKAHEAD
    ahead of the one `done` is handed, results in order. A failed job, or `done` raising,
    stops it: the jobs still queued are cancelled (the scheduler skips them)."""
    pending: deque[tuple[T, Job, asyncio.Future]] = deque()
    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) < LOOKAHEAD:
                made = await make()
                if made is None:
                    exhausted = True
                    break
                pending.append((*made, asyncio.ensure_future(submit_tile(runtime, made[1]))))
            if not pending:
                return
            item, job, future = pending.popleft()
            result = await future
            if result.error:
                raise from_worker(*result.error)
            await done(item, job, result)
    finally:
        for *_, future in pending:
            future.cancel()
        await asyncio.gather(*(f for *_, f in pending), return_exceptions=True)


async def submit_tile(runtime: Runtime, job: Job) -> JobResult:
    """One tile's job through the scheduler; a full queue delays it (up to the model deadline:
    a request's, or a job's) instead of failing a long video half-way."""
    timeout_s, timeout_name = runtime.model_deadline()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return (await runtime.scheduler.submit([job], timeout_s, timeout_name))[0]
        except Overloaded as exc:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(min(MAX_BACKOFF_S, exc.retry_after or MAX_BACKOFF_S))


def temp_path(suffix: str) -> str:
    handle, path = tempfile.mkstemp(prefix="atoken-", suffix=suffix)
    os.close(handle)
    return path


# ----------------------------------------------------------------------------- operations
@dataclass
class Reconstruction:
    path: str
    psnr: float | None
    audio: str
    run: TileRun


async def reconstruct(runtime: Runtime, source: VideoSource, mode: str, fmt: str,
                      progress: Progress | None = None) -> Reconstruction:
    """The video's reconstruction muxed frame by frame into a temporary file (audio copied)."""
    plan = source.plan
    path = temp_path("." + fmt)
    writer = vid.VideoWriter(path, plan.fps, fmt, source.data if plan.info.audio else None, plan.sampling.start_s)
    size = plan.resize.original
    squared, count = 0.0, 0

    def consume(tile: Tile) -> None:
        nonlocal squared, count
        rec = model_size_frames(tile.result.tubelets, tile.job.batch.coords, "video", tile.frames.shape[0])
        squared += float(np.sum((rec.astype(np.float64) - tile.frames.astype(np.float64)) ** 2))
        count += rec.size
        for frame in rec:
            writer.write(img.resize_rgb(frame, size))

    run = TileRun(runtime, source, lambda batch: Job(runtime.scheduler.next_id(), "reconstruct", mode=mode,
                                                      batch=batch, pixels=True), progress)
    try:
        await run.run(consume)
        await runtime.postprocess(writer.close)
    except BaseException:
        writer.abort()
        os.unlink(path)
        raise
    mse = squared / max(count, 1)
    score = float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)
    return Reconstruction(path, score, writer.audio_note, run)


async def embed(runtime: Runtime, source: VideoSource, progress: Progress | None = None, dense: bool = False,
                also: Consumer | None = None) -> tuple[torch.Tensor, TileRun]:
    """The clip's embedding from its tiles' pooling states, merged exactly, then one pool job.
    `also` sees every tile too (dense features)."""
    states: list[PoolState] = []

    def consume(tile: Tile) -> None:
        # Merged as they come: constant memory however many tiles.
        states[:] = [merge_pool_states(states + [tile.result.pool_state])] if states else [tile.result.pool_state]
        if also:
            also(tile)

    run = TileRun(runtime, source, lambda batch: Job(runtime.scheduler.next_id(), "embed", batch=batch,
                                                      partial=True, dense=dense), progress)
    await run.run(consume)
    job = Job(runtime.scheduler.next_id(), "pool", pool_state=states[0])
    result = (await runtime.scheduler.submit([job], *runtime.model_deadline()))[0]
    if result.error:
        raise from_worker(*result.error)
    return result.embedding, run


async def tokenize(runtime: Runtime, source: VideoSource, mode: str, write: Consumer,
                   progress: Progress | None = None) -> TileRun:
    """Each tile's tokens handed to `write` in order (its coords count t from the tile's start)."""
    run = TileRun(runtime, source, lambda batch: Job(runtime.scheduler.next_id(), "tokenize", mode=mode,
                                                      batch=batch), progress)
    await run.run(write)
    return run


# ----------------------------------------------------------------------------- /decode
TILE_FRAMES = TEMPORAL_TILE * vid.TUBELET  # video frames one tile of tokens decodes to


def token_tiles(tokens: Tokens) -> int:
    """Temporal tiles in a video's token set (t counted from 0, as /tokenize gives it)."""
    return int(tokens.coords[:, 1].max()) // TEMPORAL_TILE + 1


def tile_tokens(tokens: Tokens, k: int) -> Tokens:
    """Tile k's tokens, t re-based to 0 (as the decoder does within a tile), in their own order."""
    rows = torch.div(tokens.coords[:, 1], TEMPORAL_TILE, rounding_mode="floor") == k
    coords = tokens.coords[rows].clone()
    coords[:, 1] -= k * TEMPORAL_TILE
    pick = (lambda a: None if a is None else a[rows])
    return Tokens(coords, tokens.kinds, latents=pick(tokens.latents), indices=pick(tokens.indices))


def write_tile(writer: vid.VideoWriter, k: int, job: Job, result: JobResult, total: int,
               size: tuple[int, int]) -> None:
    """Tile k's decoded frames, those of the `total` asked for, to the writer at `size` (h, w)."""
    count = min(TILE_FRAMES, total - k * TILE_FRAMES)
    for frame in model_size_frames(result.tubelets, job.tokens.coords, "video", count):
        writer.write(img.resize_rgb(frame, size))


def tiles_for(tokens: Tokens, frames: int) -> int:
    """The tiles that hold the first `frames` frames (a set may hold more than asked for)."""
    return min(token_tiles(tokens), -(-frames // TILE_FRAMES))


@dataclass
class Decoded:
    path: str
    tokens: int
    timing: Timing


async def decode(runtime: Runtime, tokens: Tokens, media: dict, fmt: str) -> Decoded:
    """A video's tokens decoded one tile (4 latent frames, 16 frames) at a time into a temporary
    file: the decoder never holds more than a tile, nor the front end more than a tile's
    frames, whatever the length (the decoder runs each tile on its own anyway, so the frames
    equal a decode of the whole set)."""
    path = temp_path("." + fmt)
    writer = vid.VideoWriter(path, media["fps"], fmt)
    size, total = (int(media["height"]), int(media["width"])), int(media["frames"])
    tiles = iter(range(tiles_for(tokens, total)))
    queue_ms = compute_ms = 0.0

    async def make() -> tuple[int, Job] | None:
        k = next(tiles, None)
        return None if k is None else (k, Job(runtime.scheduler.next_id(), "decode", tokens=tile_tokens(tokens, k),
                                              pixels=True))

    async def done(k: int, job: Job, result: JobResult) -> None:
        nonlocal queue_ms, compute_ms
        queue_ms, compute_ms = max(queue_ms, result.extra.get("queue_ms", 0.0)), compute_ms + result.compute_ms
        await runtime.postprocess(write_tile, writer, k, job, result, total, size)

    try:
        await in_order(runtime, make, done)
        await runtime.postprocess(writer.close)
    except BaseException:
        writer.abort()
        os.unlink(path)
        raise
    return Decoded(path, len(tokens.coords), Timing(queue_ms, compute_ms, 1))
