"""The Ray engine's two stages, in a module of their own: Ray workers import the module of
the function or class they run, and a pre-processing task then needs neither torch nor the
CLI's imports (about 2 s of CPU less per worker process, which on a small machine is time
taken from the model while the run starts). The model actor imports torch when built."""

from __future__ import annotations

import pickle
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from ..priority import lower_thread_priority
from .prepare import Prepared, VideoTiles, prepare

# Pre-processing is a small share of the work and runs ahead of the model; at idle priority it
# fills the cores the model leaves idle between operations instead of taking them from it.
PREPARE_IDLE = True
# Decoded video frames one pre-processing task may hand the actor: videos are decoded in the
# task, in input order, while their frames fit (256 MiB: 1,300 frames at 256x256); the rest
# travel compressed and are decoded tile by tile on the actor, as the local engine decodes
# every video. Either way the same frames, so the same tokens.
PREPARE_VIDEO_BYTES = 256 * 2**20


def prepare_shard(item: dict, options, limits, idle: bool = False, video_bytes: int = PREPARE_VIDEO_BYTES) -> dict:
    """A Ray task: one shard's inputs (pickled `Entry`s) read and decoded (pickled: numpy arrays
    inside). Pickled both ways: Ray Data keeps rows as Arrow, which has no type for them."""
    entries = pickle.loads(item["entries"])
    prepared = _in_thread(lambda: _decode_videos([prepare(e, options, limits) for e in entries], video_bytes), idle)
    return {"shard": item["shard"], "prepared": pickle.dumps(prepared)}


def _decode_videos(items: list, budget: int) -> list:
    """The shard's videos decoded here, in order, while their frames fit `budget` bytes (from
    their plans, before decoding). One damaged part-way stays as it is: the actor meets the
    same error, where the local engine meets it, and the row fails alone."""
    for item in items:
        if isinstance(item, Prepared) and isinstance(item.sources, VideoTiles) and item.sources.decoded_bytes <= budget:
            try:
                tiles = list(item.sources)
            except Exception:  # noqa: BLE001 - reported by the actor, as the local engine reports it
                continue
            budget -= item.sources.decoded_bytes
            item.sources = tiles
    return items


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

    def __init__(self, spec, mode: str, embeddings: bool, max_batch_tokens: int, dtype: str, threads: int):
        import numpy as np

        from ..worker.backends import LocalBackend
        from .pipeline import torch_threads

        torch_threads(threads)
        self.backend = LocalBackend(spec)
        self.backend.start()
        self.args = (mode, embeddings, max_batch_tokens, np.dtype(dtype))

    def __call__(self, batch: dict) -> dict:
        from .pipeline import ShardRunner

        out = {"shard": [], "result": []}
        for shard, prepared in zip(batch["shard"], batch["prepared"]):
            runner = ShardRunner(self.backend, *self.args)
            rows, errors = runner.run(iter(pickle.loads(prepared)))
            out["shard"].append(int(shard))
            out["result"].append(pickle.dumps((rows, errors, runner.tokens)))
        return out
