"""The output folder: the manifest is rewritten after every shard, but each shard is read and
hashed once, so a run of many shards stays linear; the result equals a manifest made afresh."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from service.bulk import output, schema
from service.bulk.output import Output

HEADER = {"format": output.FORMAT, "model": {}, "options": {}, "source": "/src", "inputs": 12}


def test_each_shard_is_hashed_once_and_the_manifest_matches_a_fresh_one(tmp_path, monkeypatch):
    hashed: list[str] = []
    real_sha256 = output.sha256
    monkeypatch.setattr(output, "sha256", lambda path: hashed.append(path.name) or real_sha256(path))
    out = Output(tmp_path, HEADER)
    for k in range(4):
        table = pa.table({"key": [f"{k}-{i}" for i in range(3)]})
        out.write_shard(k, table, [{"key": f"bad-{k}", "status": 415, "code": "x", "message": "m"}])
        manifest = out.finish(4)
    assert sorted(hashed) == [f"part-{k:05d}.parquet" for k in range(4)]
    assert manifest["complete"] and manifest["rows"] == 12 and manifest["errors"] == 4
    assert Output(tmp_path, HEADER).finish(4) == manifest  # a resumed run reads the same files alike
    assert (tmp_path / "errors.jsonl").read_text().count("\n") == 4


def test_shards_split_float_columns_into_byte_planes_and_read_back_exactly(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"key": f"{i}.png", "modality": "image", "kind": "image", "media": {"width": 16 * n},
             "coords": rng.integers(0, 9, (n, 4)).astype(np.int32),
             "values": rng.standard_normal((n, 8)).astype(np.float16),
             "embedding": rng.standard_normal(6).astype(np.float32)} for i, n in enumerate((3, 1, 5))]
    table = schema.table(rows, schema.schema("continuous", 8, "float16", 6))
    Output(tmp_path, HEADER).write_shard(0, table, [])
    shard = pq.ParquetFile(tmp_path / "part-00000.parquet")
    chunks = shard.metadata.row_group(0)
    encodings = {chunks.column(i).path_in_schema: chunks.column(i).encodings for i in range(chunks.num_columns)}
    assert "BYTE_STREAM_SPLIT" in encodings["latents.list.element.list.element"]
    assert "BYTE_STREAM_SPLIT" in encodings["embedding.list.element"]
    assert "RLE_DICTIONARY" in encodings["coords.list.element.list.element"]
    back = shard.read()
    assert back.equals(table)
    for row, latents, coords in zip(rows, back.column("latents").to_pylist(), back.column("coords").to_pylist()):
        np.testing.assert_array_equal(np.array(latents, np.float16), row["values"])
        np.testing.assert_array_equal(np.array(coords, np.int32), row["coords"])
