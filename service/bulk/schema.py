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


def _nested(rows: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    """[n, w] -> one list<fixed_size_list<., w>> value, without going through Python objects."""
    flat = pa.array(np.ascontiguousarray(rows).reshape(-1), type=arrow_type.value_type.value_type)
    inner = pa.FixedSizeListArray.from_arrays(flat, arrow_type.value_type.list_size)
    return pa.ListArray.from_arrays(pa.array([0, rows.shape[0]], pa.int32()), inner)


def table(rows: list[dict], schema_: pa.Schema) -> pa.Table:
    """Rows (key, modality, kind, media dict, coords [n, 4], values [n, w], embedding [D]) -> a table."""
    value_field = schema_.field(6)
    columns = {name: [] for name in schema_.names}
    for row in rows:
        columns["key"].append(row["key"])
        columns["modality"].append(row["modality"])
        columns["kind"].append(row["kind"])
        columns["media"].append(json.dumps(row["media"], sort_keys=True))
        columns["num_tokens"].append(int(row["coords"].shape[0]))
        columns["coords"].append(_nested(row["coords"].astype(np.int32), schema_.field("coords").type))
        values = row["values"].astype(value_field.type.value_type.value_type.to_pandas_dtype())
        columns[value_field.name].append(_nested(values, value_field.type))
        if "embedding" in columns:
            columns["embedding"].append(row["embedding"].astype(np.float32))
    arrays = []
    for field in schema_:
        data = columns[field.name]
        if field.name in ("coords", value_field.name):
            arrays.append(pa.concat_arrays(data) if data else pa.array([], field.type))
        elif field.name == "embedding":
            flat = pa.array(np.concatenate(data) if data else np.zeros(0, np.float32), pa.float32())
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, field.type.list_size))
        else:
            arrays.append(pa.array(data, field.type))
    return pa.Table.from_arrays(arrays, schema=schema_)
