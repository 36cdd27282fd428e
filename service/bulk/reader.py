"""Rows of a tokenized dataset for training code: `read_rows` (a plain generator) and
`TokenShards` (a torch IterableDataset that deals shards to dataloader workers and distributed
ranks, so every row is read exactly once per epoch across all of them).

    from service.bulk.reader import TokenShards
    loader = torch.utils.data.DataLoader(TokenShards("tokens/"), batch_size=None, num_workers=2)
    for row in loader:  # {"key", "modality", "kind", "media", "coords" [n, 4], "latents" [n, C], ...}
        ...

Only pyarrow, numpy and torch are needed; the files are plain Parquet (see service.bulk.schema)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

NESTED = ("coords", "latents", "indices")


def shards(out_dir: str | Path) -> list[Path]:
    """The shard files in order (from the manifest when there is one)."""
    out_dir = Path(out_dir)
    manifest = out_dir / "manifest.json"
    if manifest.exists():
        return [out_dir / s["file"] for s in json.loads(manifest.read_text())["shards"]]
    return sorted(out_dir.glob("part-*.parquet"))


def _nested(column: pa.ListArray) -> list[np.ndarray]:
    """list<fixed_size_list<., w>> -> one [n_i, w] array per row (views into one buffer)."""
    width = column.type.value_type.list_size
    flat = column.values.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    offsets = column.offsets.to_numpy()
    return [flat[offsets[i]:offsets[i + 1]] for i in range(len(column))]


def read_shard(path: str | Path, columns: list[str] | None = None) -> Iterator[dict]:
    table = pq.read_table(path, columns=columns)
    for batch in table.to_batches():
        cols = {}
        for name in batch.schema.names:
            column = batch.column(name)
            if name in NESTED:
                cols[name] = _nested(column)
            elif name == "embedding":
                cols[name] = list(column.values.to_numpy().reshape(len(column), -1))
            elif name == "media":
                cols[name] = [json.loads(v) for v in column.to_pylist()]
            else:
                cols[name] = column.to_pylist()
        for i in range(batch.num_rows):
            yield {name: values[i] for name, values in cols.items()}


def read_rows(out_dir: str | Path, columns: list[str] | None = None) -> Iterator[dict]:
    for path in shards(out_dir):
        yield from read_shard(path, columns)


class TokenShards(torch.utils.data.IterableDataset):
    """Shards dealt round-robin over (rank, worker): with R ranks and W workers, reader r*W + w
    reads shards r*W + w, r*W + w + R*W, ... Use at least R*W shards (`--shard-rows`)."""

    def __init__(self, out_dir: str | Path, rank: int | None = None, world_size: int | None = None,
                 columns: list[str] | None = None):
        self.files = shards(out_dir)
        if rank is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.rank, self.world_size, self.columns = rank or 0, world_size or 1, columns

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        reader, readers = self.rank * workers + worker, self.world_size * workers
        for path in self.files[reader::readers]:
            yield from read_shard(path, self.columns)
