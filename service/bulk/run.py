"""`atoken tokenize-dataset SRC OUT`: list the inputs, skip finished shards, run the rest on the
local engine (pre-processing threads feeding the model in this process) or on Ray Data
(pre-processing tasks, the model in actors), write shards, manifest and errors."""

from __future__ import annotations

import importlib
import itertools
import os
import pickle
import sys
import threading
import time
from collections import deque
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator

from tqdm import tqdm

from model.sparse import SparseBatch

from ..deps import options_from_raw
from ..errors import InvalidParameter
from ..priority import lower_thread_priority
from ..settings import Settings
from ..worker.jobs import FRAME_VALUES
from . import on_ray, schema
from .output import FORMAT, Output
from .on_ray import PREPARE_IDLE, RayModel, prepare_shard
from .pipeline import ShardRunner, built, torch_threads, value_dtype
from .prepare import Prepared, VideoTiles, prepare
from .sources import Entry, list_inputs


@dataclass
class RunConfig:
    src: str
    out: str
    tokens: str = "continuous"
    embeddings: bool = False
    shard_rows: int = 1000
    dtype: str = "float32"  # of latents: float32 or float16
    options: dict = field(default_factory=dict)  # the API's sampling options, as text
    engine: str = "local"
    threads: int = 0  # torch threads for the model (0: all cores); the same on every engine
    progress: bool = False
    batch_tokens: int = 0  # token passes per model batch (0: ATOKEN_BULK_BATCH_TOKENS)


class ReadAhead:
    """fn over items in a thread pool, results in input order. At most `parallel` items run at
    once and `window` are ahead of the consumer, and none starts while the finished results
    waiting for the consumer weigh `budget` or more: what reading ahead holds is bounded by
    cost, not only by item count. A finishing item starts the next, so decoding runs on while
    the consumer is busy."""

    def __init__(self, pool: ThreadPoolExecutor, fn: Callable, items: Iterable, window: int, parallel: int,
                 weight: Callable[[object], int] = lambda _: 0, budget: float = float("inf")):
        self.pool, self.fn, self.items = pool, fn, iter(items)
        self.window, self.parallel, self.weight, self.budget = window, parallel, weight, budget
        self.slots: deque[Future] = deque()  # one per item started and not yet consumed, in input order
        # Kept as counts, not recounted over the slots at every start and finish: the recount
        # was O(window) Python per event (7% of the decoding threads' py-spy samples).
        self.running = 0  # started, not finished
        self.waiting = 0.0  # weight of the finished results not yet consumed
        self.weights: dict[Future, float] = {}  # each finished slot's part of `waiting`
        self.lock = threading.Lock()  # held for bookkeeping only: never across a call into the pool

    def _room(self) -> bool:
        return len(self.slots) < self.window and self.running < self.parallel and self.waiting < self.budget

    def _fill(self) -> None:
        while True:
            with self.lock:
                item = next(self.items, _END) if self._room() else _END
                if item is _END:
                    return
                slot: Future = Future()
                self.slots.append(slot)
                self.running += 1
            try:
                task = self.pool.submit(self.fn, item)
            except RuntimeError:  # the pool was shut down: the run has stopped
                slot.cancel()
                return
            task.add_done_callback(lambda task, slot=slot: self._settle(task, slot))

    def _settle(self, task: Future, slot: Future) -> None:
        if task.cancelled():  # in the pool's shutdown, which holds its lock: start nothing here
            slot.cancel()
            return
        failed = task.exception()
        with self.lock:  # counted before the consumer can see the result and take it away
            self.running -= 1
            if failed is None:
                self.weights[slot] = self.weight(task.result())
                self.waiting += self.weights[slot]
        if failed is not None:
            slot.set_exception(failed)
        else:
            slot.set_result(task.result())
        self._fill()

    def __iter__(self) -> Iterator:
        self._fill()
        while True:
            with self.lock:
                if not self.slots:
                    return
                head = self.slots[0]
            try:
                result = head.result()
            except CancelledError:  # the pool was shut down with it queued: the run has stopped
                return
            with self.lock:
                self.slots.popleft()
                self.waiting -= self.weights.pop(head, 0)
            self._fill()
            yield result


_END = object()


def _checked(cfg: RunConfig, settings: Settings) -> RunConfig:
    """The run's options refused before any work, with the limit named (as the API's 422, which
    the CLI prints as such; a ValueError would print as an internal error); the batch cap resolved.
    A batch holds its inputs (up to 3072 bytes a token pass for video) and the pass's
    activations, so its cap is bounded like everything the service holds at once."""
    if cfg.dtype not in ("float32", "float16"):
        raise InvalidParameter("--dtype must be float32 or float16")
    if cfg.shard_rows < 1:
        raise InvalidParameter("--shard-rows must be at least 1", limit=1)
    batch_tokens = cfg.batch_tokens or settings.bulk_batch_tokens
    if not 1 <= batch_tokens <= settings.max_queue_tokens:
        raise InvalidParameter(f"--batch-tokens must be 1 to {settings.max_queue_tokens} token passes "
                               "(ATOKEN_MAX_QUEUE_TOKENS, the most the service holds at once)",
                               limit=settings.max_queue_tokens)
    return replace(cfg, batch_tokens=batch_tokens)


def tokenize_dataset(cfg: RunConfig, settings: Settings | None = None) -> dict:
    settings = (settings or Settings()).without_deadlines()
    options = options_from_raw(cfg.options)
    cfg = _checked(cfg, settings)
    entries = list_inputs(cfg.src)
    shards = [entries[i:i + cfg.shard_rows] for i in range(0, len(entries), cfg.shard_rows)] or [[]]
    threads = cfg.threads or os.cpu_count() or 1
    engine = (RayEngine if cfg.engine == "ray" else LocalEngine)(settings, cfg, options, threads)
    info = engine.start()
    model = {**info, **info.get("modes", {}).get(cfg.tokens, {})}  # widths at the top, identity per mode
    header = {"format": FORMAT, "source": os.path.abspath(cfg.src), "inputs": len(entries),
              "model": {"variant": model.get("variant"), "sha256": model.get("sha256"), "card": model.get("card")},
              "options": {"tokens": cfg.tokens, "embeddings": cfg.embeddings, "shard_rows": cfg.shard_rows,
                          "dtype": cfg.dtype, "batch_tokens": cfg.batch_tokens,
                          **{k: str(v) for k, v in sorted(cfg.options.items())}}}
    out = Output(cfg.out, header)
    width = model.get("num_codebooks") if cfg.tokens == "discrete" else model.get("latent_channels")
    dtype = value_dtype(model, cfg.tokens, cfg.dtype)
    table_schema = schema.schema(cfg.tokens, int(width), cfg.dtype, model.get("embed_dim") if cfg.embeddings else None,
                                 str(dtype))
    todo = [k for k in range(len(shards)) if not out.done(k)]
    done_items = sum(len(shards[k]) for k in range(len(shards)) if k not in todo)
    bar = tqdm(total=len(entries), initial=done_items, unit="item", disable=not cfg.progress, file=sys.stderr,
               dynamic_ncols=True, desc="tokenize")
    writer = ShardWriter(out, len(shards), table_schema, settings.bulk_decode_nice)
    start, items, tokens, failed = time.monotonic(), 0, 0, 0
    try:
        for k, rows, errors, shard_tokens in engine.run(todo, shards, str(dtype), bar):
            writer.put(k, rows, errors)
            items, tokens, failed = items + len(shards[k]), tokens + shard_tokens, failed + len(errors)
            elapsed = max(time.monotonic() - start, 1e-9)
            bar.set_postfix(tokens_per_s=f"{tokens / elapsed:.0f}", errors=failed)
        writer.wait()
    finally:
        writer.close()  # a shard the model has finished is still written when the run stops
        bar.close()
        engine.stop()
    manifest = out.finish(len(shards))
    elapsed = time.monotonic() - start
    return {"items": items, "rows": manifest["rows"], "errors": manifest["errors"], "skipped_shards": len(shards) - len(todo),
            "seconds": elapsed, "items_per_s": items / max(elapsed, 1e-9), "tokens_per_s": tokens / max(elapsed, 1e-9)}


class ShardWriter:
    """Shards written in order on a thread of their own while the model computes the next one:
    Arrow conversion, zstd and the disk took 0.1-0.5 s of the model's thread per 250-image
    shard on a 2-core CPU, where a GPU would compute such a shard in a fraction of that. One
    write at a time: `put` first waits for the one before, so a run holds at most two shards'
    rows, and a failed write stops the run at the next shard with its error. At the decoding
    threads' priority: on a CPU it fills what the model leaves of the cores."""

    def __init__(self, out: Output, shards: int, table_schema, nice: int):
        self.out, self.shards, self.table_schema = out, shards, table_schema
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="atoken-write",
                                       initializer=lambda: lower_thread_priority(nice))
        self.pending: Future | None = None

    def put(self, k: int, rows: list[dict], errors: list[dict]) -> None:
        self.wait()
        self.pending = self.pool.submit(self._write, k, rows, errors)

    def _write(self, k: int, rows: list[dict], errors: list[dict]) -> None:
        self.out.write_shard(k, schema.table(rows, self.table_schema), errors)
        self.out.finish(self.shards)

    def wait(self) -> None:
        """The shard handed over last is on disk (its write's error raised here)."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class LocalEngine:
    """Pre-processing threads keep the next inputs ready while the model runs this batch."""

    def __init__(self, settings: Settings, cfg: RunConfig, options, threads: int):
        from ..worker.backends import LocalBackend

        self.settings, self.cfg, self.options, self.threads = settings, cfg, options, threads
        self.backend = LocalBackend(settings.model_spec, timed=False)
        # Decoding at a lower priority (bulk_decode_nice), reading well ahead: it fills what the
        # model's threads leave of the cores (between operations, a lane waiting for its
        # partner) rather than taking cores from them (docs/bulk.md). Nice, not idle: faster
        # in paired runs, and still served on a machine that other work keeps busy.
        self.workers = max(2, threads)
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="atoken-bulk",
                                       initializer=lambda: lower_thread_priority(settings.bulk_decode_nice))

    def start(self) -> dict:
        torch_threads(self.threads)
        # pyarrow's first conversion imports pandas where it is installed (0.35 s): done on a
        # decoding thread while the model loads, not on the model's thread at the first shard.
        self.pool.submit(schema.warm_up)
        return self.backend.start()

    def stop(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def run(self, todo: list[int], shards: list[list[Entry]], dtype: str, bar):
        limits = self.settings.limits
        # One read-ahead over every shard to do, so decoding runs on across shard boundaries.
        prepared = iter(ReadAhead(self.pool, lambda e: built(prepare(e, self.options, limits)),
                                   [e for k in todo for e in shards[k]], window=READ_AHEAD_ITEMS,
                                   parallel=self.workers, weight=held_tokens,
                                   budget=READ_AHEAD_BATCHES * self.cfg.batch_tokens))
        for k in todo:
            runner = ShardRunner(self.backend, self.cfg.tokens, self.cfg.embeddings, self.cfg.batch_tokens,
                                 _np_dtype(dtype))
            rows, errors = runner.run(_ticking(itertools.islice(prepared, len(shards[k])), bar))
            yield k, rows, errors, runner.tokens


# How far the local engine decodes ahead of the model: up to 3 model batches of tokens ready
# (decoded uint8 patches: at most 3 x 3072 bytes a token pass), and at most 64 inputs.
READ_AHEAD_BATCHES = 3
READ_AHEAD_ITEMS = 64


def held_tokens(item) -> int:
    """What a decoded input holds, in token rows: its built model input, or for a video (its
    tiles decoded later) its compressed file counted as image token rows of the same bytes
    (up to ATOKEN_MAX_UPLOAD_BYTES, 64 MB, each: the window's 64 of them must not all wait at once)."""
    if not isinstance(item, Prepared):
        return 0
    if isinstance(item.sources, VideoTiles):
        return -(-item.sources.held_bytes // FRAME_VALUES)
    return sum(source.coords.shape[0] for _, source in item.sources if isinstance(source, SparseBatch))


def _ticking(items: Iterator, bar) -> Iterator:
    for item in items:
        yield item
        bar.update(1)


def _np_dtype(name: str):
    import numpy as np

    return np.dtype(name)


# ----------------------------------------------------------------------------- Ray Data
class RayEngine:
    """Ray Data: a dataset of shards; pre-processing in parallel tasks (`map`), the model in a
    class-based `map_batches` stage held by actors (`num_gpus` each on GPU nodes), rows back to
    the driver, which writes shards, manifest and errors exactly as the local engine does."""

    def __init__(self, settings: Settings, cfg: RunConfig, options, threads: int):
        self.settings, self.cfg, self.options, self.threads = settings, cfg, options, threads
        self.started_ray = False

    def start(self) -> dict:
        import ray

        # The driver reads the model's identity on its own CPU while Ray starts: a Ray task for
        # it would cost a worker process and a second model load before any work begins. Ray
        # Data (half a second of imports) loads meanwhile too.
        with ThreadPoolExecutor(2) as pool:
            info = pool.submit(_describe, self.settings.model_spec)
            pool.submit(importlib.import_module, "ray.data")
            if not ray.is_initialized():
                address = os.environ.get("RAY_ADDRESS")
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         **({} if address else {"num_cpus": os.cpu_count()}))
                self.started_ray = True
            return info.result()

    def stop(self) -> None:
        import ray

        if self.started_ray:
            ray.shutdown()

    def run(self, todo: list[int], shards: list[list[Entry]], dtype: str, bar):
        import ray

        if not todo:
            return
        spec, limits, cfg = self.settings.model_spec, self.settings.limits, self.cfg
        gpu = spec.device.startswith("cuda")
        ds = ray.data.from_items([{"shard": k, "entries": pickle.dumps(shards[k])} for k in todo],
                                 override_num_blocks=len(todo))
        # Three quarters of a CPU per pre-processing task: beside the model actor's one CPU a 2-core
        # node runs one task at a time (each task process costs seconds of CPU to start, taken
        # from the model on a small machine; one keeps well ahead of it), a 16-core node twenty.
        # Not a whole CPU: with the actor's resources Ray Data's optimiser fuses the two stages.
        ds = ds.map(prepare_shard, fn_kwargs={"options": self.options, "limits": limits, "idle": PREPARE_IDLE,
                                              "budget": on_ray.PREPARE_BYTES}, num_cpus=0.75)
        ds = ds.map_batches(RayModel, batch_size=1, compute=ray.data.ActorPoolStrategy(size=1),
                            num_gpus=1 if gpu else 0, num_cpus=1,
                            fn_constructor_kwargs={"spec": spec, "mode": cfg.tokens, "embeddings": cfg.embeddings,
                                                   "max_batch_tokens": cfg.batch_tokens,
                                                   "dtype": dtype, "threads": self.threads,
                                                   "options": self.options, "limits": limits,
                                                   "nice": self.settings.bulk_decode_nice})
        # No prefetching: with it, a shard's result reached the driver (to be written, and counted
        # by the progress bar) only once the model had computed the next shard as well.
        for batch in ds.iter_batches(batch_size=None, prefetch_batches=0, batch_format="numpy"):
            for k, result in zip(batch["shard"].tolist(), batch["result"]):
                rows, errors, tokens = pickle.loads(result)
                bar.update(len(shards[k]))
                yield k, rows, errors, tokens


def _describe(spec) -> dict:
    """What the model stage will report, read on the CPU without a forward pass."""
    from dataclasses import replace

    from ..worker.backends import describe
    from ..worker.loader import load_tokenizers

    return describe(load_tokenizers(replace(spec, device="cpu")))
