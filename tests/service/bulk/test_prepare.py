"""Bulk pre-processing: what a Ray task process does (read and decode) needs no torch, and the
model inputs built from its arrays are exactly those the HTTP routes build."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import torch

from service.bulk.pipeline import built
from service.bulk.prepare import Failed, Prepared, prepare
from service.bulk.sources import Entry
from service.inputs import Options, Pixels
from service.media.limits import MediaLimits
from service.pipeline import preprocess
from tests import assets
from tests.conftest import ROOT

LIMITS = MediaLimits(max_side=128)


def _entry(tmp_path, name: str, data: bytes) -> Entry:
    path = tmp_path / name
    path.write_bytes(data)
    return Entry(name, str(path), size=len(data))


def test_a_pre_processing_process_never_imports_torch(tmp_path):
    image = _entry(tmp_path, "chelsea.png", assets.image("chelsea.png").read_bytes())
    video = _entry(tmp_path, "talk.mp4", assets.clip_with_audio(1.5))
    code = (
        "import pickle, sys\n"
        "from service.bulk import on_ray\n"
        "from service.bulk.sources import Entry\n"
        "from service.inputs import Options\n"
        "from service.media.limits import MediaLimits\n"
        f"entries = [Entry({image.key!r}, {image.path!r}, size={image.size}),"
        f" Entry({video.key!r}, {video.path!r}, size={video.size})]\n"
        "out = on_ray.prepare_shard({'shard': 0, 'entries': pickle.dumps(entries)}, Options(),"
        " MediaLimits(max_side=128))\n"
        "assert out['shard'] == 0 and out['prepared']\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "ok"


def test_decoded_inputs_build_the_routes_model_inputs(tmp_path):
    for name, data in (("chelsea.png", assets.image("chelsea.png").read_bytes()),
                       ("talk.mp4", assets.clip_with_audio(1.5))):
        prepared = prepare(_entry(tmp_path, name, data), Options(), LIMITS)
        assert isinstance(prepared, Prepared)
        assert all(isinstance(source, Pixels) and source.frames.dtype.name == "uint8" for _, source in prepared.sources)
        item = preprocess(data, Options(), LIMITS)
        if item.streamed:  # a video: tiles of 16 frames, the last padded to whole tubelets
            assert [frames for frames, _ in prepared.sources] == [len(t) for t in item.stream.tiles()]
            assert all(source.frames.shape[0] % 4 == 0 for _, source in prepared.sources)
            continue
        batch = built(prepared).sources[0][1]
        assert torch.equal(batch.feats, item.batch.feats) and torch.equal(batch.coords, item.batch.coords)
        assert prepared.media == item.media


def test_a_prepared_video_travels_as_its_file_not_its_frames(tmp_path):
    """What a Ray task hands the model actor: the compressed video and its plan, decoded a tile
    at a time where it runs (up to 36,000 frames are allowed; they never all exist at once)."""
    data = assets.clip_with_audio(3.0)
    prepared = prepare(_entry(tmp_path, "talk.mp4", data), Options(), LIMITS)
    tiles = [(frames, source.frames) for frames, source in prepared.sources]
    decoded = sum(frames.nbytes for _, frames in tiles)
    blob = pickle.dumps(prepared)
    assert len(tiles) > 1 and len(blob) < len(data) + 4096 < decoded
    again = [(frames, source.frames) for frames, source in pickle.loads(blob).sources]
    assert [f for f, _ in again] == [f for f, _ in tiles]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(again, tiles))


def test_a_ray_task_decodes_videos_within_its_budget(tmp_path):
    """Decoded in the task while the frames fit (known from the header: an upper bound, every
    tile counted whole); beyond, the video travels compressed to the actor."""
    from service.bulk import on_ray

    entry = _entry(tmp_path, "talk.mp4", assets.clip_with_audio(3.0))
    planned = prepare(entry, Options(), LIMITS).sources.decoded_bytes
    for budget, in_task in ((planned - 1, False), (planned, True)):
        out = on_ray.prepare_shard({"shard": 0, "entries": pickle.dumps([entry])}, Options(), LIMITS, budget=budget)
        (item,) = pickle.loads(out["prepared"])
        assert isinstance(item.sources, list) == in_task
        if in_task:
            frames = [source.frames for _, source in item.sources]
            decoded = sum(f.nbytes for f in frames)
            assert decoded <= planned < decoded + 16 * frames[0][0].nbytes  # within the last tile's padding


def test_a_ray_task_holds_its_budget_and_one_input_at_most(tmp_path):
    """Inputs are prepared in order while the budget lasts (the one that spends it is kept);
    the rest travel as entries, for the actor to prepare as the model reaches them."""
    from service.bulk import on_ray

    names = ("chelsea.png", "coffee.png", "camera.png", "rocket.jpg")
    entries = [_entry(tmp_path, name, assets.image(name).read_bytes()) for name in names]
    sizes = [on_ray._held(prepare(e, Options(), LIMITS)) for e in entries]
    for budget, in_task in ((0, 0), (1, 1), (sizes[0], 1), (sizes[0] + 1, 2), (sum(sizes), 4)):
        items = on_ray.prepare_within(entries, Options(), LIMITS, budget)
        assert [isinstance(x, Prepared) for x in items] == [True] * in_task + [False] * (4 - in_task)
        assert items[in_task:] == entries[in_task:]
        for item, entry in zip(items[:in_task], entries):
            expected = prepare(entry, Options(), LIMITS)
            assert np.array_equal(item.sources[0][1].frames, expected.sources[0][1].frames)


def test_a_bad_input_is_the_error_the_api_gives(tmp_path):
    failed = prepare(_entry(tmp_path, "notes.png", b"not a picture"), Options(), LIMITS)
    assert isinstance(failed, Failed)
    assert (failed.status, failed.code) == (415, "unsupported_media_type")


def test_the_model_actor_hands_its_model_built_inputs_in_order(tmp_path):
    """The actor builds each input's model input ahead of the model, as the local engine does,
    for inputs a task decoded and for entries it left, in input order: its model thread only
    runs passes."""
    from service.bulk.on_ray import RayModel
    from service.settings import Settings

    names = ("chelsea.png", "coffee.png", "camera.png")
    entries = [_entry(tmp_path, name, assets.image(name).read_bytes()) for name in names]
    items = [prepare(entries[0], Options(), LIMITS), entries[1], prepare(entries[2], Options(), LIMITS)]
    # threads=0: leaves this test process's torch threads as they are
    actor = RayModel(Settings(variant="tiny", dtype="float32").model_spec, "continuous", False, 4096, "float32",
                     0, Options(), LIMITS, 10)
    out = list(actor._prepared(items))
    actor.pool.shutdown()
    assert [x.key for x in out] == list(names)
    for item, entry in zip(out, entries):
        batch, expected = item.sources[0][1], built(prepare(entry, Options(), LIMITS)).sources[0][1]
        assert torch.equal(batch.feats, expected.feats) and torch.equal(batch.coords, expected.coords)
