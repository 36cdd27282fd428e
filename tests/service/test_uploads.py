"""Large uploads stay on disk: a video is decoded from the file, the answer equals the in-memory
path's, and no spilled file outlives its request (or its job's submission)."""

from __future__ import annotations

import glob
import os
import tempfile

import numpy as np

from service.inputs import Options
from service.pipeline import preprocess
from service.settings import Settings
from service.uploads import SPILL_BYTES, DiskUpload, spill
from tests import assets
from tests.service.server import LiveServer

CLIP = assets.clip_with_audio(30)  # about 1.7 MB: over the spill threshold


def _spilled() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "atoken-upload-*")))


def test_a_video_on_disk_plans_and_decodes_like_its_bytes(tmp_path):
    assert len(CLIP) > SPILL_BYTES
    path = tmp_path / "clip.mp4"
    path.write_bytes(CLIP)
    limits = Settings(max_side=128).limits
    on_disk = preprocess(DiskUpload(str(path), len(CLIP), owned=False), Options(), limits)
    in_memory = preprocess(CLIP, Options(), limits)
    assert on_disk.stream.data == str(path) and on_disk.media == in_memory.media
    for a, b in zip(on_disk.stream.tiles(), in_memory.stream.tiles()):
        assert np.array_equal(a, b)
    with open(path, "rb") as f:
        copy = spill(f, limit=len(CLIP))
    assert copy.size == len(CLIP) and copy.read() == CLIP
    copy.close()
    assert not os.path.exists(copy.path)


def test_spilled_uploads_are_deleted_after_the_request(tmp_path):
    before = _spilled()
    with LiveServer(worker="thread", max_side=128) as live, live.client() as c:
        multipart = c.post("/reconstruct", files={"file": ("clip.mp4", CLIP)})
        raw = c.post("/reconstruct", content=CLIP, headers={"content-type": "video/mp4"})
        assert multipart.status_code == raw.status_code == 200
        assert multipart.headers["x-round-trip-psnr"] == raw.headers["x-round-trip-psnr"]
        assert multipart.headers["x-audio"] == "copied"
        refused = c.post("/reconstruct?fps=nan", files={"file": ("clip.mp4", CLIP)})
        assert refused.status_code == 422
        job = c.post("/jobs/tokenize", files={"file": ("clip.mp4", CLIP)})
        assert job.status_code == 202
        assert _spilled() == before  # answered, refused or moved into the job: nothing left behind
