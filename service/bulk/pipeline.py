"""One shard's work, the same for every engine: inputs -> model jobs (an image or 3D asset is
one job, a video one job per 16-frame tile) -> batches formed greedily by token cost in input
order -> rows. Batches depend only on the inputs, never on timing, so a resumed run and the Ray
engine compute exactly the numbers a single uninterrupted local run computes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from model.layers.attention import PoolState, merge_pool_states
from model.sparse import SparseBatch

from ..errors import from_worker
from ..media import video as vid
from ..pipeline import model_input
from ..worker.jobs import Job
from .prepare import Failed, Prepared, failure


def built(item: Prepared | Failed) -> Prepared | Failed:
    """An image's or 3D asset's model input built now, in the calling (pre-processing) thread,
    not on the model's; a video's tiles are decoded and built as the model reaches them."""
    if isinstance(item, Prepared) and not item.video:
        item.sources = [(frames, model_input(source)) for frames, source in item.sources]
    return item


@dataclass
class _Row:
    prepared: Prepared
    # (values [n, L or K] in the output dtype, coords [n, 4] int32 (t, x, y, z)) per tile, in
    # tile order (batches run, and return, in input order): only what the row keeps, not the
    # job (its input) nor the result (its log-variance), so a long video holds its latents,
    # not every tile's pixels, until its last tile has run
    parts: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    states: list[PoolState] = field(default_factory=list)
    failed: Failed | None = None
    embedding: np.ndarray | None = None
    frames: int = 0


class ShardRunner:
    """Runs prepared inputs through a backend (`run(jobs) -> results`) in deterministic batches."""

    def __init__(self, backend, mode: str, embeddings: bool, max_batch_tokens: int, value_dtype: np.dtype):
        self.backend, self.mode, self.embeddings = backend, mode, embeddings
        self.max_batch_tokens, self.value_dtype = max_batch_tokens, value_dtype
        self.tokens = 0

    def run(self, prepared: Iterator[Prepared | Failed]) -> tuple[list[dict], list[dict]]:
        rows: list[_Row | Failed] = []
        pending: list[tuple[_Row, int, Job]] = []
        cost, next_id = 0, 0
        for item in prepared:
            if isinstance(item, Failed):
                rows.append(item)
                continue
            row = _Row(item)
            rows.append(row)
            try:
                for tile, (frames, source) in enumerate(item.sources):
                    row.frames += frames
                    batch = source if isinstance(source, SparseBatch) else model_input(source)
                    job = Job(next_id, "tokenize", mode=self.mode, batch=batch,
                              partial=item.video and self.embeddings, embedding=self.embeddings and not item.video)
                    next_id += 1
                    if pending and cost + job.cost > self.max_batch_tokens:
                        self._flush(pending)
                        pending, cost = [], 0
                    pending.append((row, tile, job))
                    cost += job.cost
            except Exception as exc:  # noqa: BLE001 - a video damaged part-way fails alone
                row.failed = failure(item.key, exc)
            # Its inputs live on only in the pending jobs, until their batch has run: a shard
            # holds its outputs, not every input's pixels until its last row.
            item.sources = ()
        if pending:
            self._flush(pending)
        self._pool([r for r in rows if isinstance(r, _Row) and r.prepared.video and self.embeddings and not r.failed])
        return self._assemble(rows)

    def _flush(self, pending: list[tuple[_Row, int, Job]]) -> None:
        results = self.backend.run([job for _, _, job in pending])
        for (row, tile, job), result in zip(pending, results):
            if result.error:
                row.failed = row.failed or failure(row.prepared.key, from_worker(*result.error))
                continue
            t = result.tokens
            values = (t.indices if t.indices is not None else t.latents).numpy().astype(self.value_dtype)
            coords = job.batch.coords[:, 1:].numpy().astype(np.int32)
            coords[:, 0] += tile * (vid.TILE // vid.TUBELET)  # a video's tiles count t from their own start
            row.parts.append((values, coords))
            if result.embedding is not None:
                row.embedding = result.embedding.numpy()
            if result.pool_state is not None:
                row.states.append(result.pool_state)
            self.tokens += job.num_tokens

    def _pool(self, rows: list[_Row]) -> None:
        if not rows:
            return
        jobs = [Job(-1 - i, "pool", pool_state=merge_pool_states(r.states)) for i, r in enumerate(rows)]
        for row, result in zip(rows, self.backend.run(jobs)):
            row.embedding = result.embedding.numpy()

    def _assemble(self, rows: list) -> tuple[list[dict], list[dict]]:
        out, errors = [], []
        for row in rows:
            if isinstance(row, Failed) or row.failed:
                errors.append((row if isinstance(row, Failed) else row.failed).record())
                continue
            media = dict(row.prepared.media)
            if row.prepared.video:
                media["frames"] = row.frames
            out.append({"key": row.prepared.key, "modality": row.prepared.modality, "kind": row.prepared.kind,
                        "media": media, "coords": np.concatenate([c for _, c in row.parts]),
                        "values": np.concatenate([v for v, _ in row.parts]), "embedding": row.embedding})
        return out, errors


def value_dtype(info: dict, mode: str, dtype: str) -> np.dtype:
    if mode == "discrete":
        return np.dtype(np.uint16 if (info.get("codebook_size") or 0) <= 2**16 else np.int32)
    return np.dtype(dtype)


def torch_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)
