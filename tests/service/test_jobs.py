"""The job API end to end on a real server: lifecycle, progress, results equal to the synchronous
answers, cancellation, restarts, ownership, the disk cap and expiry."""

from __future__ import annotations

import dataclasses
import io
import time
from pathlib import Path

import av
import pytest
from PIL import Image

from tests import assets
from tests.service.server import LiveServer

PHOTO = assets.image("chelsea.png").read_bytes()
SETTINGS = dict(worker="thread", max_side=128, max_wait_ms=1)


@pytest.fixture(scope="module")
def long_clip() -> bytes:
    return assets.clip_with_audio(40)  # 75 tiles at 128 px: long enough to watch and to cancel


def _submit(c, op: str, data: bytes, name: str = "f", query: str = "", **kw):
    return c.post(f"/jobs/{op}{query}", files={"file": (name, data)}, **kw)


def _wait(c, job: dict, until=("succeeded", "failed", "cancelled"), timeout: float = 120) -> tuple[dict, list[int]]:
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(job["links"]["self"]).json()
        seen.append(job["progress"]["done"])
        if job["status"] in until:
            return job, seen
        time.sleep(0.05)
    raise AssertionError(f"job stuck: {job}")


def test_a_job_answers_exactly_what_the_route_answers(tmp_path):
    with LiveServer(jobs_dir=str(tmp_path), **SETTINGS) as live, live.client() as c:
        for op, accept in (("reconstruct", None), ("tokenize", None), ("encode", None),
                           ("tokenize", "application/vnd.safetensors")):
            headers = {"accept": accept} if accept else {}
            r = _submit(c, op, PHOTO, headers=headers)
            assert r.status_code == 202, r.text
            job = r.json()
            assert r.headers["location"] == job["links"]["self"] and job["status"] in ("queued", "running")
            job, _ = _wait(c, job)
            assert job["status"] == "succeeded" and job["progress"]["done"] == job["progress"]["total"] == 1
            result = c.get(job["links"]["result"])
            sync = c.post(f"/{op}", files={"file": ("f", PHOTO)}, headers=headers)
            assert result.status_code == sync.status_code == 200
            assert result.headers["content-type"] == sync.headers["content-type"]
            if op == "encode":  # floats from a batch of one either way; JSON bytes equal too
                assert result.json()["items"][0]["embedding"] == sync.json()["items"][0]["embedding"]
            else:
                assert result.content == sync.content, op
        assert c.get("/jobs/nope").status_code == 404
        assert c.get("/jobs/nope/result").json()["error"]["code"] == "job_not_found"
        metrics = c.get("/metrics").text
        assert 'atoken_async_jobs{status="succeeded"} 4.0' in metrics
        assert "atoken_async_job_steps_total 4.0" in metrics


def test_a_video_over_the_request_budget_is_served_as_a_job(tmp_path):
    """The video budget is sized to a request's deadline; a job is how longer work is served, so
    it allows what the other limits allow (max_frames x max_pixels)."""
    clip = assets.video("carphone_pristine.mp4").read_bytes()
    with LiveServer(jobs_dir=str(tmp_path), max_video_pixels=10**6, **SETTINGS) as live, live.client() as c:
        sync = c.post("/tokenize", files={"file": ("v.mp4", clip)})
        assert sync.status_code == 413 and "max_video_pixels" in sync.json()["error"]["message"]
        job, _ = _wait(c, _submit(c, "tokenize", clip, "v.mp4").json())
        assert job["status"] == "succeeded", job


def test_a_finished_video_job_reads_as_done_when_its_header_promised_a_tile_more(tmp_path):
    """16 frames of bikes.mp4 lie in [0.013 s, 0.663 s); the header's span of 16.25 frames is
    counted as 17 (an upper bound), two tiles. The job ends at 1 of 1."""
    clip = assets.video("bikes.mp4").read_bytes()
    with LiveServer(jobs_dir=str(tmp_path), **SETTINGS) as live, live.client() as c:
        job, _ = _wait(c, _submit(c, "tokenize", clip, "bikes.mp4", "?start=0.013&end=0.663").json())
        assert job["status"] == "succeeded" and job["progress"] | {"done": 1, "total": 1} == job["progress"]
        assert c.get(job["links"]["result"]).json()["items"][0]["media"]["frames"] == 16


def test_progress_moves_per_tile_and_cancel_stops_a_long_video(tmp_path, long_clip):
    with LiveServer(jobs_dir=str(tmp_path), **SETTINGS) as live, live.client() as c:
        job = _submit(c, "reconstruct", long_clip, "long.mp4").json()
        early = c.get(job["links"]["result"])
        assert early.status_code == 409 and "Retry-After" in early.headers
        job, seen = _wait(c, job, until=("running",))
        deadline = time.monotonic() + 60
        while job["progress"]["done"] < 3 and time.monotonic() < deadline:
            job = c.get(job["links"]["self"]).json()
        assert job["progress"]["unit"] == "tiles" and job["progress"]["total"] == 75
        assert job["eta_s"] is not None and job["eta_s"] > 0
        assert c.delete(job["links"]["self"]).status_code == 202  # stops at the next tile
        job, seen = _wait(c, job)
        assert job["status"] == "cancelled" and job["progress"]["done"] < 75
        assert seen == sorted(seen)  # progress never goes back
        assert c.get(job["links"]["result"]).status_code == 410
        assert not list(Path(tmp_path).glob(f"{job['id']}.*"))  # its files are gone
        # The queue is free again: a new request is answered at once.
        assert c.post("/encode", files={"file": ("p", PHOTO)}).status_code == 200


def test_results_survive_a_restart_and_interrupted_jobs_read_failed(tmp_path, long_clip):
    with LiveServer(jobs_dir=str(tmp_path), **SETTINGS) as live, live.client() as c:
        done, _ = _wait(c, _submit(c, "reconstruct", PHOTO).json())
        expected = c.get(done["links"]["result"]).content
        running = _submit(c, "reconstruct", long_clip, "long.mp4").json()
        _wait(c, running, until=("running",))
    with LiveServer(jobs_dir=str(tmp_path), **SETTINGS) as live, live.client() as c:
        assert c.get(done["links"]["result"]).content == expected
        job = c.get(running["links"]["self"]).json()
        assert job["status"] == "failed" and "restarted" in job["error"]["message"]
        assert c.get(running["links"]["result"]).status_code == 503


def test_jobs_belong_to_their_api_key(tmp_path):
    with LiveServer(jobs_dir=str(tmp_path), api_keys="k1,k2", **SETTINGS) as live, live.client() as c:
        mine = {"Authorization": "Bearer k1"}
        theirs = {"X-API-Key": "k2"}
        job = _submit(c, "encode", PHOTO, headers=mine).json()
        with live.client(headers=mine) as owner:
            job, _ = _wait(owner, job)
        assert c.get(job["links"]["self"]).status_code == 401
        assert c.get(job["links"]["self"], headers=theirs).status_code == 404
        assert c.get(job["links"]["result"], headers=theirs).status_code == 404
        assert c.delete(job["links"]["self"], headers=theirs).status_code == 404
        assert c.get(job["links"]["result"], headers=mine).status_code == 200
        assert c.delete(job["links"]["self"], headers=mine).status_code == 204
        assert c.get(job["links"]["self"], headers=mine).status_code == 404


def test_a_full_disk_cap_answers_507_and_expired_results_410(tmp_path):
    with LiveServer(jobs_dir=str(tmp_path), job_ttl_s=3600, **SETTINGS) as live, live.client() as c:
        first, _ = _wait(c, _submit(c, "reconstruct", PHOTO).json())
        assert first["status"] == "succeeded"
        store = live.runtime.jobs.store
        store.config = dataclasses.replace(store.config, max_bytes=store.used_bytes() + len(PHOTO) - 1)
        refused = _submit(c, "reconstruct", PHOTO)
        assert refused.status_code == 507 and refused.json()["error"]["code"] == "insufficient_storage"
        assert c.get(first["links"]["result"]).status_code == 200  # never deleted to make room
        live.runtime.jobs.store.expire(now=time.time() + 3700)
        assert c.get(first["links"]["result"]).status_code == 410
        assert c.get(first["links"]["self"]).json()["expired"] is True
        assert _submit(c, "reconstruct", PHOTO).status_code == 202  # expired results free the space


def test_a_result_over_the_cap_fails_the_job_with_507_and_is_not_kept(tmp_path):
    """The cap holds for results too, whose size is known only at the end: a small upload whose
    tokens do not fit fails with the limit named, and the store never holds more than the cap."""
    flat = io.BytesIO()
    Image.new("RGB", (128, 128), (90, 120, 200)).save(flat, "PNG")
    flat = flat.getvalue()
    cap = len(flat) + 2000
    with LiveServer(jobs_dir=str(tmp_path), jobs_max_bytes=cap, **SETTINGS) as live, live.client() as c:
        job, _ = _wait(c, _submit(c, "tokenize", flat, "flat.png").json())
        assert job["status"] == "failed" and job["error"]["code"] == "insufficient_storage"
        assert f"of {cap} bytes" in job["error"]["message"] and "result of" in job["error"]["message"]
        answer = c.get(job["links"]["result"])
        assert answer.status_code == 507 and answer.json()["error"]["code"] == "insufficient_storage"
        store = live.runtime.jobs.store
        assert store.used_bytes() <= cap and not store.result_path(job["id"]).exists()
        assert not list(tmp_path.glob(f"{job['id']}.*"))  # its input is gone too


def test_a_video_damaged_half_way_fails_naming_where(tmp_path):
    bad = assets.clip_with_audio(5, corrupt_at=0.5)
    with LiveServer(jobs_dir=str(tmp_path), **SETTINGS) as live, live.client() as c:
        sync = c.post("/reconstruct", files={"file": ("bad.mp4", bad)})
        assert sync.status_code == 422 and "after frame" in sync.json()["error"]["message"]
        job, _ = _wait(c, _submit(c, "reconstruct", bad, "bad.mp4").json())
        assert job["status"] == "failed" and job["error"]["code"] == "invalid_media"
        assert " s)" in job["error"]["message"] and "after frame" in job["error"]["message"]
        result = c.get(job["links"]["result"])
        assert result.status_code == 422 and result.json()["error"] == job["error"]


def test_bad_input_is_refused_at_submission(tmp_path):
    with LiveServer(jobs_dir=str(tmp_path), **SETTINGS) as live, live.client() as c:
        r = _submit(c, "reconstruct", b"not media")
        assert r.status_code == 415
        assert c.post("/jobs/explode", files={"file": ("f", PHOTO)}).status_code == 422
        assert c.post("/jobs/encode?format=AAA", files={"file": ("f", PHOTO)}).status_code == 422
        assert not list(Path(tmp_path).glob("*.in*"))


def test_audio_is_copied_for_a_short_clip(tmp_path):
    clip = assets.clip_with_audio(3)
    with LiveServer(jobs_dir=str(tmp_path), **SETTINGS) as live, live.client() as c:
        r = c.post("/reconstruct", files={"file": ("c.mp4", clip)})
        assert r.status_code == 200 and r.headers["x-audio"] == "copied"
    with av.open(io.BytesIO(r.content)) as out:
        assert [s.type for s in out.streams] == ["video", "audio"]


def test_images_are_served_while_a_long_video_runs(tmp_path, long_clip):
    """The video's tiles share the queue: an image waits for the tiles ahead of it, not the video."""
    with LiveServer(jobs_dir=str(tmp_path), **SETTINGS) as live, live.client() as c:
        job = _submit(c, "reconstruct", long_clip, "long.mp4").json()
        _wait(c, job, until=("running",))
        for _ in range(5):
            assert c.post("/encode", files={"file": ("p", PHOTO)}).status_code == 200
        state = c.get(job["links"]["self"]).json()
        assert state["status"] == "running" and state["progress"]["done"] < state["progress"]["total"], state
        c.delete(job["links"]["self"])


def test_uploads_and_results_are_readable_by_the_service_user_only(tmp_path):
    from service.jobs import JobsConfig, JobStore

    store = JobStore(JobsConfig(tmp_path / "jobs"))
    job = store.create("", "encode", [b"small upload, kept in memory"], {})
    assert oct(store.input_path(job["id"], 0).stat().st_mode & 0o777) == "0o600"
    store.succeed(job["id"], None, b'{"items": []}', "application/json", {})
    assert oct(store.result_path(job["id"]).stat().st_mode & 0o777) == "0o600"
    assert oct(store.dir.stat().st_mode & 0o777) == "0o700"
    store.close()
