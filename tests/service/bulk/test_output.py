"""The output folder: the manifest is rewritten after every shard, but each shard is read and
hashed once, so a run of many shards stays linear; the result equals a manifest made afresh."""

from __future__ import annotations

import pyarrow as pa

from service.bulk import output
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
