"""`atoken tokenize-dataset` on a generated mixed folder: rows and errors, resumption, the Ray
engine against the local one, the reader across workers, and `atoken decode`."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from service.bulk.reader import TokenShards, read_rows
from service.bulk.run import RunConfig, tokenize_dataset
from service.errors import InvalidParameter
from service.settings import Settings
from tests import assets
from tests.conftest import ROOT

# float32: rows are compared with the API's answers, which batch differently (bf16 rounds them apart)
# A voxel limit under the sphere's 19,565 voxels: one input over the limits.
SETTINGS = dict(variant="tiny", max_side=128, worker="thread", dtype="float32", max_item_tokens=16384)
CORRUPT = {"broken/truncated.png", "broken/noise.jpg", "broken/notes.png"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mixed")
    (root / "images").mkdir()
    for name in ("chelsea.png", "coffee.png", "camera.png", "rocket.jpg"):
        (root / "images" / name).write_bytes(assets.image(name).read_bytes())
    Image.open(assets.image("astronaut.png")).resize((96, 40)).save(root / "images" / "wide.png")
    (root / "videos").mkdir()
    (root / "videos" / "talk.mp4").write_bytes(assets.clip_with_audio(1.5))
    (root / "videos" / "phone.mp4").write_bytes(assets.video("carphone_pristine.mp4").read_bytes())
    (root / "meshes").mkdir()
    for name in ("sphere.ply", "ant.ply"):
        (root / "meshes" / name).write_bytes(assets.mesh(name).read_bytes())
    (root / "broken").mkdir()
    (root / "broken" / "truncated.png").write_bytes(assets.image("chelsea.png").read_bytes()[:300])
    (root / "broken" / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(2000))
    (root / "broken" / "notes.png").write_text("not a picture")
    return root


def _run(src, out, variant="tiny", **kw):
    cfg = RunConfig(str(src), str(out), shard_rows=kw.pop("shard_rows", 4), threads=2, **kw)
    return tokenize_dataset(cfg, Settings(**{**SETTINGS, "variant": variant}))


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if not p.name.startswith(".")}


@pytest.fixture(scope="module")
def clean(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean")
    _run(dataset, out, embeddings=True)
    return out


def test_rows_errors_and_manifest(dataset, clean):
    manifest = json.loads((clean / "manifest.json").read_text())
    assert manifest["complete"] and manifest["inputs"] == 12 and manifest["rows"] == 8 and manifest["errors"] == 4
    assert manifest["model"]["variant"] == "tiny" and manifest["options"]["embeddings"] is True
    for shard in manifest["shards"]:
        assert pq.ParquetFile(clean / shard["file"]).metadata.num_rows == shard["rows"]
    errors = [json.loads(line) for line in (clean / "errors.jsonl").read_text().splitlines()]
    # Corrupt and unsupported files, and a mesh over the voxel limit, each one line (as the API says).
    assert {e["key"] for e in errors} == CORRUPT | {"meshes/sphere.ply"}
    assert {e["status"] for e in errors} == {413, 415, 422} and all(e["message"] for e in errors)
    rows = {r["key"]: r for r in read_rows(clean)}
    assert set(rows) == {"images/chelsea.png", "images/coffee.png", "images/camera.png", "images/rocket.jpg",
                         "images/wide.png", "videos/talk.mp4", "videos/phone.mp4", "meshes/ant.ply"}
    talk = rows["videos/talk.mp4"]
    assert talk["kind"] == "video" and talk["media"]["frames"] == 45
    assert talk["coords"].shape == (talk["num_tokens"], 4) and talk["latents"].shape[0] == talk["num_tokens"]
    assert talk["coords"][:, 0].max() == 11  # 45 frames: 12 latent frames over 3 tiles
    assert np.isclose(np.linalg.norm(talk["embedding"]), 1, atol=1e-4)
    assert rows["meshes/ant.ply"]["kind"] == "3D"


def test_a_video_row_decodes_tile_by_tile_to_every_frame(clean, tmp_path):
    """`atoken decode` on a video row of 3 tiles: an MP4 of its frames at its size, written a
    tile at a time (as /decode does), never all frames at once."""
    import argparse

    import av

    from service.cli import decode_row

    out = tmp_path / "talk.mp4"
    args = argparse.Namespace(out=str(clean), key="videos/talk.mp4", output=str(out), format=None)
    assert decode_row(args, Settings(**SETTINGS)) == 0
    talk = next(r for r in read_rows(clean) if r["key"] == "videos/talk.mp4")
    with av.open(str(out)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
    assert len(frames) == talk["media"]["frames"] == 45
    assert frames[0].shape == (talk["media"]["height"], talk["media"]["width"], 3)


def test_rows_equal_the_http_api(dataset, clean):
    """The same tokens the API gives for each input (same model, same options)."""
    from tests.service.server import LiveServer

    rows = {r["key"]: r for r in read_rows(clean)}
    with LiveServer(**SETTINGS) as live, live.client() as c:
        for key in ("images/coffee.png", "videos/talk.mp4"):
            doc = c.post("/tokenize?array_format=list", files={"file": (key, (dataset / key).read_bytes())}).json()
            item = doc["items"][0]
            np.testing.assert_allclose(np.array(item["latents"]["data"], np.float32), rows[key]["latents"],
                                       rtol=1e-4, atol=1e-5)
            assert np.array_equal(np.array(item["coords"]["data"]), rows[key]["coords"])
            emb = c.post("/encode", files={"file": (key, (dataset / key).read_bytes())}).json()["items"][0]
            np.testing.assert_allclose(emb["embedding"], rows[key]["embedding"], rtol=1e-4, atol=1e-5)


def test_a_killed_run_resumes_to_identical_files(dataset, clean, tmp_path):
    out = tmp_path / "resumed"
    _run(dataset, out, embeddings=True)
    first = _files(out)
    # A run killed after two shards: later shards gone, a half-written shard left behind.
    for name in list(first):
        if name.startswith(("part-00002", "part-00003")) or name in ("manifest.json", "errors.jsonl"):
            (out / name).unlink()
    (out / ".part-00002.parquet.tmp").write_bytes(b"half a shard")
    summary = _run(dataset, out, embeddings=True)
    assert summary["skipped_shards"] == 2
    assert _files(out) == first == _files(clean)
    with pytest.raises(InvalidParameter, match="other options"):
        _run(dataset, out, embeddings=False)


def test_the_batch_cap_is_recorded_and_moves_numbers_only_by_rounding(dataset, clean, tmp_path):
    """Every job alone (a cap of one token pass) against the default batches: the same rows up
    to float rounding (a packed pass's matrix products round by their shape), so the cap is an
    option of the run: recorded, and a resume with another refused."""
    out = tmp_path / "alone"
    _run(dataset, out, embeddings=True, batch_tokens=1)
    alone, batched = ({r["key"]: r for r in read_rows(folder)} for folder in (out, clean))
    assert alone.keys() == batched.keys()
    for key, row in alone.items():
        assert np.array_equal(row["coords"], batched[key]["coords"])
        np.testing.assert_allclose(row["latents"], batched[key]["latents"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(row["embedding"], batched[key]["embedding"], rtol=1e-4, atol=1e-5)
    options = [json.loads((folder / "manifest.json").read_text())["options"] for folder in (out, clean)]
    assert [o["batch_tokens"] for o in options] == [1, Settings().bulk_batch_tokens]
    with pytest.raises(InvalidParameter, match="other options"):
        _run(dataset, out, embeddings=True, batch_tokens=2)


@pytest.mark.parametrize("kw, message", [({"batch_tokens": 262145}, "ATOKEN_MAX_QUEUE_TOKENS"),
                                         ({"batch_tokens": -1}, "--batch-tokens"),
                                         ({"shard_rows": 0}, "--shard-rows")])
def test_run_sizes_are_refused_before_any_work(dataset, tmp_path, kw, message):
    out = tmp_path / "refused"
    with pytest.raises(InvalidParameter, match=message):
        _run(dataset, out, **kw)
    assert not out.exists()  # nothing read, loaded or written


def test_the_cli_names_the_refused_option(dataset, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "service", "tokenize-dataset", str(dataset), str(tmp_path / "out"),
                           "--batch-tokens", "999999"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error (422): --batch-tokens must be 1 to 262144" in proc.stderr


def test_the_ray_engine_writes_what_the_local_engine_writes(dataset, clean, tmp_path, monkeypatch):
    from service.bulk import on_ray

    # A budget that the first image or two of a shard spend: the rest of each shard (images,
    # meshes, videos) is prepared on the actor instead of in the task, to the same bytes.
    monkeypatch.setattr(on_ray, "PREPARE_BYTES", 60_000)
    out = tmp_path / "ray"
    summary = _run(dataset, out, embeddings=True, engine="ray")
    assert summary["rows"] == 8
    assert _files(out) == _files(clean)


def test_the_reader_yields_every_row_once_across_two_workers(clean):
    loader = torch.utils.data.DataLoader(TokenShards(clean), batch_size=None, num_workers=2)
    keys = [row["key"] for row in loader]
    assert sorted(keys) == sorted(r["key"] for r in read_rows(clean, columns=["key"])) and len(set(keys)) == 8
    ranks = [[r["key"] for r in TokenShards(clean, rank=k, world_size=2)] for k in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1]) and len(ranks[0]) + len(ranks[1]) == 8


def test_tar_shards_float16_discrete_and_decode_a_row(dataset, tmp_path):
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for key in ("images/chelsea.png", "images/wide.png"):
            tar.add(dataset / key, arcname=Path(key).name)
        caption = b'{"caption": "a cat"}'
        info = tarfile.TarInfo("chelsea.json")
        info.size = len(caption)
        tar.addfile(info, io.BytesIO(caption))
    out = tmp_path / "tar"
    _run(shard, out, tokens="continuous", dtype="float16")
    rows = list(read_rows(out))
    assert [r["key"] for r in rows] == ["shard-000.tar/chelsea.png", "shard-000.tar/wide.png"]
    assert rows[0]["latents"].dtype == np.float16
    _run(shard, tmp_path / "discrete", variant="tiny-d", tokens="discrete")
    coded = next(read_rows(tmp_path / "discrete"))
    assert "latents" not in coded and coded["indices"].dtype == np.uint16
    assert coded["indices"].shape[0] == coded["num_tokens"] and coded["indices"].max() < 4096
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "ATOKEN_VARIANT": "tiny", "ATOKEN_MAX_SIDE": "128"}
    picture = tmp_path / "check.png"
    proc = subprocess.run([sys.executable, "-m", "service", "decode", str(out), "shard-000.tar/chelsea.png",
                           "-o", str(picture)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(picture).size == Image.open(dataset / "images" / "chelsea.png").size


def test_a_bulk_run_keeps_videos_over_the_request_budget(tmp_path, monkeypatch):
    """The API's video budget keeps a request within its deadline; a bulk run has none, so it
    allows at least what the other limits allow (max_frames x max_pixels), and only stops a
    stream that holds more than its header declares."""
    loose = Settings(**SETTINGS, max_video_pixels=10**6).without_deadlines()
    assert loose.max_video_pixels == loose.max_frames * loose.max_pixels
    assert Settings(**SETTINGS, max_video_pixels=10**15).without_deadlines().max_video_pixels == 10**15
    src = tmp_path / "src"
    src.mkdir()
    (src / "phone.mp4").write_bytes(assets.video("carphone_pristine.mp4").read_bytes())
    from service.bulk import run

    seen = []
    start = run.LocalEngine.start
    monkeypatch.setattr(run.LocalEngine, "start", lambda self: seen.append(self.settings.limits) or start(self))
    cfg = RunConfig(str(src), str(tmp_path / "out"), threads=2)
    assert tokenize_dataset(cfg, Settings(**SETTINGS, max_video_pixels=10**6))["rows"] == 1  # 413 by the API
    assert seen[0].max_video_pixels == loose.max_frames * loose.max_pixels


def test_a_bulk_run_does_not_time_the_model(tmp_path, monkeypatch):
    """Bulk batches are capped by token count, never by a measured speed: the timed passes a
    server's worker makes at start (1.5 s of an AVX2 CPU) would only delay the first input."""
    from service.worker import backends

    monkeypatch.setattr(backends, "calibrate", lambda *a, **k: pytest.fail("timed"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "chelsea.png").write_bytes(assets.image("chelsea.png").read_bytes())
    assert _run(src, tmp_path / "out")["rows"] == 1


def _images(folder: Path, count: int) -> Path:
    folder.mkdir()
    for i in range(count):
        Image.open(assets.image("chelsea.png")).crop((i, 0, i + 64, 64)).save(folder / f"{i}.png")
    return folder


def test_the_model_computes_the_next_shard_while_a_shard_is_written(tmp_path, monkeypatch):
    """Writing a shard (Arrow, zstd, the disk) does not hold up the model: shard 0's write is
    made to wait until the model has started on shard 1. Written in turn on the model's own
    thread, it would wait in vain."""
    from service.bulk import output, pipeline

    next_shard_started, waited = threading.Event(), []
    run_shard = pipeline.ShardRunner.run

    def run(self, items):
        runs.append(self)
        if len(runs) == 2:
            next_shard_started.set()
        return run_shard(self, items)

    def write_shard(self, index, table, errors):
        if index == 0:
            waited.append(next_shard_started.wait(timeout=20))
        write(self, index, table, errors)

    runs: list = []
    write = output.Output.write_shard
    monkeypatch.setattr(pipeline.ShardRunner, "run", run)
    monkeypatch.setattr(output.Output, "write_shard", write_shard)
    out = tmp_path / "out"
    summary = _run(_images(tmp_path / "src", 3), out, shard_rows=1)
    assert waited == [True]
    assert summary["rows"] == 3 and json.loads((out / "manifest.json").read_text())["complete"]


def test_a_failed_write_stops_the_run_with_its_error(tmp_path, monkeypatch):
    """A shard that cannot be written (a full disk) ends the run at the next shard, with that
    error; the shards before it are whole, and no later one is written."""
    from service.bulk import output

    write = output.Output.write_shard

    def write_shard(self, index, table, errors):
        if index == 1:
            raise OSError(28, "No space left on device")
        write(self, index, table, errors)

    monkeypatch.setattr(output.Output, "write_shard", write_shard)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        _run(_images(tmp_path / "src", 4), out, shard_rows=1)
    assert pq.read_table(out / "part-00000.parquet").num_rows == 1
    assert not any(out.glob("part-0000[1-3].parquet"))
