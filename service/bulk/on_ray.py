"""The Ray engine's two stages, in a module of their own: Ray workers import the module of
the function or class they run, and a pre-processing task then needs neither torch nor the
CLI's imports (about 2 s of CPU less per worker process, which on a small machine is time
taken from the model while the run starts). The model actor imports torch when built."""

from __future__ import annotations

import pickle
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

from ..priority import lower_thread_priority
from .prepare import Prepared, VideoTiles, prepare
from .sources import Entry

# Pre-processing is a small share of the work and runs ahead of the model; at idle priority it
# fills the cores the model leaves idle between operations instead of taking them from it.
PREPARE_IDLE = True
# What one pre-processing task may hand the actor decoded (256 MiB: 1,300 video frames, or 1,300
# images, at 256x256). Inputs are prepared in order while it lasts; the rest go to the actor as
# they are (a video compressed with its plan, anything after the budget as its `Entry`) and are
# prepared there as the model reaches them, as the local engine prepares every input. Either way
# the same arrays, so the same tokens; and neither a task nor the actor holds a whole shard of
# decoded inputs, which for --shard-rows 1000 of 1024-pixel images would be 3 GB, twice over.
PREPARE_BYTES = 256 * 2**20


def prepare_shard(item: dict, options, limits, idle: bool = False, budget: int = PREPARE_BYTES) -> dict:
    """A Ray task: one shard's inputs (pickled `Entry`s) read and decoded within `budget` bytes
    (pickled: numpy arrays inside). Pickled both ways: Ray Data keeps rows as Arrow, which has
    no type for them."""
    entries = pickle.loads(item["entries"])
    prepared = _in_thread(lambda: prepare_within(entries, options, limits, budget), idle)
    return {"shard": item["shard"], "prepared": pickle.dumps(prepared)}


def prepare_within(entries: list[Entry], options, limits, budget: int) -> list:
    """Entries prepared in order while what they hold fits `budget`: a video's frames counted
    from its header before decoding (beyond, it stays compressed), an image's or asset's arrays
    once decoded, so a task holds at most the budget and one input (bounded by the media
    limits). Once it is spent, the rest stay entries. A video damaged part-way stays as it is:
    the actor meets the same error, where the local engine meets it, and the row fails alone."""
    out: list = []
    for i, entry in enumerate(entries):
        if budget <= 0:
            return out + entries[i:]
        item = prepare(entry, options, limits)
        if isinstance(item, Prepared):
            budget -= _decoded_within(item, budget)
        out.append(item)
    return out


def _decoded_within(item: Prepared, budget: int) -> int:
    """Decodes a video's tiles now if they fit; the bytes the item then holds."""
    if not isinstance(item.sources, VideoTiles) or item.sources.decoded_bytes > budget:
        return _held(item)
    try:
        tiles = list(item.sources)
    except Exception:  # noqa: BLE001 - reported by the actor, as the local engine reports it
        return item.sources.held_bytes
    item.sources = tiles
    return _held(item)


def _held(item: Prepared) -> int:
    """The bytes a prepared input holds: its arrays, or a video's compressed file."""
    if isinstance(item.sources, VideoTiles):
        return item.sources.held_bytes
    return sum(sum(a.nbytes for a in vars(source).values()) for _, source in item.sources)


def _in_thread(fn: Callable, idle: bool):
    """fn() in a fresh thread, at idle scheduling priority if asked (Linux: per thread), so the
    pooled Ray worker running this task keeps its own priority for whatever it runs next."""
    def run():
        if idle:
            lower_thread_priority(None)
        return fn()

    with ThreadPoolExecutor(1, thread_name_prefix="atoken-prepare") as pool:
        return pool.submit(run).result()


class RayModel:
    """The model, loaded once per actor; runs one shard's prepared inputs per call."""

    def __init__(self, spec, mode: str, embeddings: bool, max_batch_tokens: int, dtype: str, threads: int,
                 options, limits, nice: int):
        import numpy as np

        from ..worker.backends import LocalBackend
        from .pipeline import torch_threads

        torch_threads(threads)
        self.backend = LocalBackend(spec, timed=False)
        self.backend.start()
        self.args = (mode, embeddings, max_batch_tokens, np.dtype(dtype))
        self.options, self.limits = options, limits
        # Inputs are built (and entries a task left, beyond its budget, decoded) here, a thread
        # ahead of the model at the local engine's decoding priority and read-ahead bound
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="atoken-prepare",
                                       initializer=lambda: lower_thread_priority(nice))

    def __call__(self, batch: dict) -> dict:
        from .pipeline import ShardRunner

        out = {"shard": [], "result": []}
        for shard, items in zip(batch["shard"], batch["prepared"]):
            runner = ShardRunner(self.backend, *self.args)
            rows, errors = runner.run(self._prepared(pickle.loads(items)))
            out["shard"].append(int(shard))
            out["result"].append(pickle.dumps((rows, errors, runner.tokens)))
        return out

    def _prepared(self, items: list) -> Iterator:
        """A shard's items as the model reaches them, each built into its model input in the
        pre-processing thread, as the local engine builds them: an image's patches made on
        the model's thread would leave its lanes idle. Entries a task left are decoded there too."""
        from .pipeline import built
        from .run import READ_AHEAD_BATCHES, READ_AHEAD_ITEMS, ReadAhead, held_tokens

        def one(x):
            return built(prepare(x, self.options, self.limits) if isinstance(x, Entry) else x)

        _, _, max_batch_tokens, _ = self.args
        return iter(ReadAhead(self.pool, one, items, window=READ_AHEAD_ITEMS, parallel=1, weight=held_tokens,
                              budget=READ_AHEAD_BATCHES * max_batch_tokens))
