"""The Parquet layout of a tokenized dataset: one row per input, readable with plain pyarrow,
pandas or Hugging Face `datasets` (no project code needed).

| column | Arrow type | meaning |
| --- | --- | --- |
| key | string | the input's path relative to SRC, or `<shard.tar>/<member>` |
| modality | string | image, video, mesh or volume (from the content) |
| kind | string | the model's kind: image, video or 3D |
| media | string | JSON: sizes, fps, frames, as the API's `media` |
| num_tokens | int32 | n |
| coords | list<fixed_size_list<int32, 4>> | [n, 4]: t, x (row), y (column), z |
| latents | list<fixed_size_list<float16 or float32, C>> | [n, C] continuous tokens (`--tokens continuous`) |
| indices | list<fixed_size_list<uint16 or int32, K>> | [n, K] FSQ indices (`--tokens discrete`) |
| embedding | fixed_size_list<float32, D> | the global L2-normalised embedding (`--embeddings`) |
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

COLUMNS = {line.split("|")[1].strip(): line.split("|")[3].strip()
           for line in __doc__.splitlines() if line.startswith("| ") and not line.startswith("| column")
           and not line.startswith("| ---")}


def schema(mode: str, width: int, dtype: str, embed_dim: int | None, index_dtype: str = "uint16") -> pa.Schema:
    values = pa.list_(pa.list_(pa.from_numpy_dtype(np.dtype(index_dtype if mode == "discrete" else dtype)), width))
    fields = [pa.field("key", pa.string()), pa.field("modality", pa.string()), pa.field("kind", pa.string()),
              pa.field("media", pa.string()), pa.field("num_tokens", pa.int32()),
              pa.field("coords", pa.list_(pa.list_(pa.int32(), 4))),
              pa.field("indices" if mode == "discrete" else "latents", values)]
    if embed_dim:
        fields.append(pa.field("embedding", pa.list_(pa.float32(), embed_dim)))
    return pa.schema(fields, metadata={"columns": json.dumps(COLUMNS)})


def _nested(parts: list[np.ndarray], arrow_type: pa.DataType) -> pa.Array:
    """Rows' [n_i, w] arrays -> one list<fixed_size_list<., w>> column, one value per row, built
    from one concatenated buffer and its offsets (no Python objects, no per-row arrays)."""
    width, value_type = arrow_type.value_type.list_size, arrow_type.value_type.value_type
    flat = np.concatenate([p.reshape(-1) for p in parts]) if parts else np.zeros(0)
    inner = pa.FixedSizeListArray.from_arrays(_typed(flat, value_type), width)
    offsets = np.zeros(len(parts) + 1, np.int32)
    np.cumsum([p.shape[0] for p in parts], out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


def warm_up() -> None:
    """pyarrow imports pandas (when installed) at its first conversion: one call pays it."""
    pa.array(np.zeros(1, np.float32))


def _typed(flat: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    """A numpy array as an Arrow array of `arrow_type` (rows arrive in it; cast otherwise)."""
    array = pa.array(flat)
    return array if array.type == arrow_type else array.cast(arrow_type)


def table(rows: list[dict], schema_: pa.Schema) -> pa.Table:
    """Rows (key, modality, kind, media dict, coords [n, 4], values [n, w], embedding [D]) -> a table."""
    value_field = schema_.field(6)
    columns = {
        "key": pa.array([row["key"] for row in rows], pa.string()),
        "modality": pa.array([row["modality"] for row in rows], pa.string()),
        "kind": pa.array([row["kind"] for row in rows], pa.string()),
        "media": pa.array([json.dumps(row["media"], sort_keys=True) for row in rows], pa.string()),
        "num_tokens": pa.array([row["coords"].shape[0] for row in rows], pa.int32()),
        "coords": _nested([row["coords"] for row in rows], schema_.field("coords").type),
        value_field.name: _nested([row["values"] for row in rows], value_field.type),
    }
    if "embedding" in schema_.names:
        field = schema_.field("embedding")
        flat = np.concatenate([row["embedding"] for row in rows]) if rows else np.zeros(0)
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(_typed(flat, pa.float32()), field.type.list_size)
    return pa.Table.from_arrays([columns[name] for name in schema_.names], schema=schema_)
