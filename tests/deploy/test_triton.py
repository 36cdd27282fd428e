"""Conformance: a real Triton Inference Server (from the nvidia-pytriton wheel, CPU, loopback)
gives the same tokens, embeddings and reconstructions as the in-process worker."""

import dataclasses
import os
import importlib.util

import numpy as np
import pytest
import torch

from service.inputs import Options
from service.media import video as vid
from service.pipeline import preprocess
from service.settings import Settings
from service.worker.backends import LocalBackend
from service.worker.jobs import Job, pixel_patches
from tests import assets
from tests.service.worker.results import assert_results_close

pytestmark = pytest.mark.skipif(importlib.util.find_spec("pytriton") is None or
                                importlib.util.find_spec("tritonclient") is None,
                                reason="nvidia-pytriton / tritonclient not installed")


@pytest.fixture(scope="module")
def triton():
    from service.triton_launch import TritonServer

    # float32: conformance compares numbers across different batchings (bf16 rounds them apart).
    # Passes of at most 256 tokens: a batch of jobs runs in several.
    with TritonServer(env=SMALL) as server:
        yield server


SMALL = {"ATOKEN_MAX_SIDE": "128", "ATOKEN_VARIANT": "tiny", "ATOKEN_DTYPE": "float32", "ATOKEN_MAX_BATCH_TOKENS": "256"}


def _items():
    limits = Settings(max_side=128).limits
    files = [assets.image("chelsea.png"), assets.image("rocket.jpg"), assets.video("carphone_pristine.mp4")]
    items = [preprocess(f.read_bytes(), Options(max_frames=8), limits) for f in files]
    # A video runs tile by tile: its first (here only) tile is the job.
    items = [dataclasses.replace(i, batch=pixel_patches(vid.pad_to_tubelets(next(i.stream.tiles())))) if i.streamed
             else i for i in items]
    npz = np.random.default_rng(0)
    import io

    buf = io.BytesIO()
    coords = np.unique(npz.integers(10, 30, (40, 3)), axis=0)
    np.savez(buf, coords=coords, feats=npz.integers(0, 255, (len(coords), 768)).astype(np.uint8))
    items.append(preprocess(buf.getvalue(), Options(), limits))
    return items


def test_triton_matches_in_process(triton):
    from service.triton_backend import TritonBackend

    local = LocalBackend(Settings(variant="tiny", dtype="float32").model_spec)
    local.start()
    remote = TritonBackend(triton.url)
    info = remote.start()
    assert info["variant"] == local.info["variant"]
    items = _items()
    jobs = []
    for i, item in enumerate(items):
        jobs += [Job(3 * i, "embed", batch=item.batch), Job(3 * i + 1, "tokenize", batch=item.batch),
                 Job(3 * i + 2, "reconstruct", batch=item.batch, gaussians=True)]
    ours, theirs = local.run(jobs), remote.run(jobs)
    for a, b in zip(ours, theirs):
        assert a.error is None and b.error is None, (a.error, b.error)
        torch.testing.assert_close(b.embedding, a.embedding, rtol=1e-4, atol=1e-5)
        if a.tokens is not None:
            torch.testing.assert_close(b.tokens.latents, a.tokens.latents, rtol=1e-4, atol=1e-4)
            assert torch.equal(b.tokens.coords, a.tokens.coords)
        if a.tubelets is not None:
            torch.testing.assert_close(b.tubelets, a.tubelets, rtol=1e-4, atol=2e-4)
        if a.gaussians is not None:
            torch.testing.assert_close(b.gaussians["xyz_raw"], a.gaussians["xyz_raw"], rtol=1e-4, atol=1e-5)
    # reconstructions as the pixels the routes ask for (an image's one frame, a video's four)
    pix = [Job(700 + i, "reconstruct", batch=item.batch, pixels=True) for i, item in enumerate(items[:3])]
    for a, b in zip(local.run(pix), remote.run(pix)):
        assert b.tubelets.dtype == torch.uint8 and b.tubelets.shape == a.tubelets.shape
        assert (b.tubelets.int() - a.tubelets.int()).abs().max() <= 1  # float rounding across batchings
    # a long video's pieces: pooling states out, a merged state back in for the embedding
    video = items[2].batch
    pieces = [Job(500, "embed", batch=video, partial=True)]
    state_ours, state_theirs = local.run(pieces)[0].pool_state, remote.run(pieces)[0].pool_state
    torch.testing.assert_close(state_theirs.weighted, state_ours.weighted, rtol=1e-4, atol=1e-5)
    pool = [Job(501, "pool", pool_state=state_ours)]
    torch.testing.assert_close(remote.run(pool)[0].embedding, local.run(pool)[0].embedding, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(local.run(pool)[0].embedding, ours[6].embedding, rtol=1e-4, atol=1e-5)
    # decode of the tokens Triton produced, on both sides
    tok = theirs[1].tokens
    dec = [Job(999, "decode", tokens=tok)]
    torch.testing.assert_close(remote.run(dec)[0].tubelets, local.run(dec)[0].tubelets, rtol=1e-4, atol=2e-4)
    # errors travel back typed: a job with coords outside the grid fails alone
    bad = items[0].batch
    bad_job = Job(1000, "embed", batch=type(bad)(bad.feats, bad.coords.clone().fill_(5000), bad.kinds))
    results = remote.run([bad_job, Job(1001, "embed", batch=items[1].batch)])
    assert results[0].error[0] == "InvalidInputError" and results[1].error is None
    remote.stop()


def test_http_api_through_triton_equals_process_worker(triton):
    from tests.service.server import LiveServer

    files = [("file", ("rocket.jpg", assets.image("rocket.jpg").read_bytes(), "image/jpeg"))]
    with LiveServer(worker="triton", triton_url=triton.url, max_side=128, dtype="float32") as live, live.client() as c:
        via_triton = c.post("/encode", files=files)
        rec_triton = c.post("/reconstruct", files=files)
        info = c.get("/info").json()
    with LiveServer(worker="thread", max_side=128, dtype="float32") as live, live.client() as c:
        local = c.post("/encode", files=files)
        rec_local = c.post("/reconstruct", files=files)
    assert via_triton.status_code == 200 and "triton" in info["model"]["backend"]
    np.testing.assert_allclose(via_triton.json()["items"][0]["embedding"], local.json()["items"][0]["embedding"],
                               rtol=1e-4, atol=1e-5)
    assert abs(float(rec_triton.headers["X-Round-Trip-PSNR"]) - float(rec_local.headers["X-Round-Trip-PSNR"])) < 0.01


def test_inputs_through_shared_memory_equal_the_wire_and_are_released(triton):
    """On loopback the inputs, and the pixels and latents that come back, go through shared
    memory (auto): the same numbers as on the wire (up to float rounding: the requests of
    different input widths may join Triton's passes differently), and stop() leaves no region
    registered at the server. An image's and a video's tokens decode side by side."""
    import tritonclient.http as http

    from service.triton_backend import TritonBackend

    items = _items()
    ops = (("embed", False), ("reconstruct", False), ("reconstruct", True), ("tokenize", False))
    jobs = [Job(0, op, batch=item.batch, pixels=pixels) for item in items for op, pixels in ops]
    shared, wire = TritonBackend(triton.url), TritonBackend(triton.url, shared_memory="off")
    assert "shared memory" in shared.start()["backend"] and "the wire" in wire.start()["backend"]
    tokens = [r.tokens for r in wire.run([Job(k, "tokenize", batch=items[k].batch) for k in (0, 2)])]
    jobs += [Job(0, "decode", tokens=t, pixels=True) for t in tokens]
    jobs = [dataclasses.replace(j, id=k) for k, j in enumerate(jobs)]
    server = http.InferenceServerClient(triton.url)
    assert len(server.get_system_shared_memory_status()) >= 1
    for a, b in zip(shared.run(jobs), wire.run(jobs)):
        assert a.error is None and b.error is None, (a.error, b.error)
        assert (a.embedding is None) == (b.embedding is None) and (a.tubelets is None) == (b.tubelets is None)
        assert (a.tokens is None) == (b.tokens is None)
        if a.embedding is not None:
            torch.testing.assert_close(a.embedding, b.embedding, rtol=1e-4, atol=1e-5)
        if a.tubelets is not None and a.tubelets.dtype == torch.uint8:
            assert a.tubelets.shape == b.tubelets.shape and (a.tubelets.int() - b.tubelets.int()).abs().max() <= 1
        elif a.tubelets is not None:
            torch.testing.assert_close(a.tubelets, b.tubelets, rtol=1e-4, atol=2e-4)
        if a.tokens is not None:
            torch.testing.assert_close(a.tokens.latents, b.tokens.latents, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(a.tokens.logvar, b.tokens.logvar, rtol=1e-4, atol=1e-4)
    shared.stop()
    wire.stop()
    assert server.get_system_shared_memory_status() == []


def test_a_server_that_cannot_map_our_memory_gets_the_wire_or_a_clear_error(triton, monkeypatch):
    """A Triton on another host's /dev/shm (here: registration refused) gets the inputs on the
    wire under `auto`, and `on` fails to start with the reason, instead of failing requests."""
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    from service.triton_backend import TritonBackend
    from service.worker.backends import WorkerDied

    def refuse(self, name, key, byte_size, offset=0, headers=None, query_params=None):
        raise InferenceServerException(f"Unable to open shared memory region: '{key}'")

    monkeypatch.setattr(http.InferenceServerClient, "register_system_shared_memory", refuse)
    auto = TritonBackend(triton.url)
    assert "the wire" in auto.start()["backend"] and auto.regions is None
    assert auto.run([Job(1, "embed", batch=_items()[0].batch)])[0].error is None
    auto.stop()
    with pytest.raises(WorkerDied, match="cannot map"):
        TritonBackend(triton.url, shared_memory="on").start()
    assert TritonBackend("triton.internal:8000").shared_memory == "auto"  # not loopback: never tried


def test_regions_a_killed_front_end_left_at_the_server_are_freed_by_the_next(triton):
    """A front end killed with requests done keeps its regions registered (and mapped) at the
    server; the next front end to start frees them, and leaves a living one's alone."""
    import os
    import signal
    import subprocess
    import sys

    import tritonclient.http as http

    from service.triton_backend import TritonBackend
    from tests.conftest import ROOT

    code = (
        "import os, signal\n"
        "import numpy as np\n"
        "from service.triton_backend import TritonBackend\n"
        "from service.worker.jobs import Job, pixel_patches\n"
        f"backend = TritonBackend({triton.url!r})\n"
        "backend.start()\n"
        "assert backend.run([Job(0, 'embed', batch=pixel_patches(np.zeros((1, 32, 32, 3), np.uint8)))])[0].error is None\n"
        "print(backend.regions._prefix, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    server = http.InferenceServerClient(triton.url)
    living = TritonBackend(triton.url)
    living.start()
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    dead = run.stdout.strip()

    def registered(prefix: str) -> list[str]:
        return [r["name"] for r in server.get_system_shared_memory_status() if r["name"].startswith(prefix + "-")]

    assert registered(dead), "the killed front end's regions should still be registered"
    starting = TritonBackend(triton.url)
    starting.start()
    assert registered(dead) == []
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(dead)]
    assert registered(living.regions._prefix) and registered(starting.regions._prefix)
    for backend in (living, starting):
        backend.stop()
    assert server.get_system_shared_memory_status() == []


def _many_batches_at_once_each_get_their_own_answers(url: str, lanes: int, repeat: int) -> None:
    """Front-end batches of 1-3 jobs, six on the wire at once, against the in-process worker."""
    from concurrent.futures import ThreadPoolExecutor

    from service.triton_backend import TritonBackend

    local = LocalBackend(Settings(variant="tiny", dtype="float32").model_spec)
    local.start()
    remote = TritonBackend(url, max_inflight_batches=6)
    assert remote.start()["lanes"] == lanes
    # past one batch a lane and one waiting, small batches wait (Scheduler._hold_small_batch);
    # for each server behind the address
    assert remote.hold_after == (lanes + 1 if lanes + 1 < 6 else None)
    two = TritonBackend(url, max_inflight_batches=64, replicas=2)
    two.start()
    two.stop()
    assert two.hold_after == 2 * (lanes + 1)
    items = _items()[:2]
    batches = [[Job(10 * b + k, op, batch=items[(b + k) % 2].batch) for k in range(1 + b % 3)]
               for b, op in enumerate(["embed", "reconstruct", "tokenize"] * repeat)]
    try:
        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(remote.run, batches))
    finally:
        remote.stop()
    for batch, answers in zip(batches, got):
        assert [r.id for r in answers] == [j.id for j in batch]
        assert_results_close(local.run(batch), answers, rtol=1e-4, atol=2e-4)


def test_batches_side_by_side_in_the_model_answer_each_request_with_its_own_numbers(triton):
    """With lanes `execute` queues its requests and returns; a lane that frees takes what is
    queued, requests of several `execute` calls in one pass, and answers them later. Many
    front-end batches at once: each gets its own answers, with the numbers of one batch at a
    time (job ids from different calls once collided in a pass: an answer never came). A lane
    per core, as the process worker has (the backend stub's OpenMP says one thread)."""
    _many_batches_at_once_each_get_their_own_answers(triton.url, len(os.sched_getaffinity(0)), 4)


def test_one_lane_answers_early_through_senders_and_last_in_executes_return():
    """On one lane every pass runs inside `execute`: requests done before its last pass are
    answered through their response senders while later passes run, the last pass's in
    `execute`'s return value (some places None). Requests Triton joins into one `execute`,
    in several passes each: every one gets its own answers."""
    from service.triton_launch import TritonServer

    with TritonServer(env=dict(SMALL, ATOKEN_LANE_BATCHES="0")) as server:
        _many_batches_at_once_each_get_their_own_answers(server.url, 1, 2)


def test_the_servers_own_shared_memory_is_named_for_it_and_kept_while_it_lives(triton):
    """The Python backend names its regions with the prefix the launcher claimed (its lock held
    by the server), so a later launch can tell a dead server's regions from a living one's."""
    import glob

    from service.triton_launch import SHM, reclaim_stale

    prefix = triton.regions[1]
    regions = glob.glob(os.path.join(SHM, prefix + "*"))
    assert regions, os.listdir(SHM)
    assert not set(map(os.path.basename, regions)) & set(reclaim_stale())
    assert all(os.path.exists(r) for r in regions)
    assert triton.proc.poll() is None


def _random_jobs(rng: np.random.Generator, items: list, tokens: list, state, count: int) -> list[Job]:
    """Jobs of every op, kind and flag the routes send, mixed at random."""
    jobs = []
    for i in range(count):
        op = str(rng.choice(["embed", "tokenize", "reconstruct", "decode", "pool"]))
        flag = lambda: bool(rng.random() < 0.5)  # noqa: E731
        k = int(rng.integers(len(items)))
        if op == "pool":
            jobs.append(Job(i, "pool", pool_state=state))
        elif op == "decode":
            jobs.append(Job(i, "decode", tokens=tokens[k], pixels=flag(), gaussians=flag()))
        elif op == "embed":
            jobs.append(Job(i, "embed", batch=items[k].batch, dense=flag(), partial=flag()))
        else:
            jobs.append(Job(i, op, batch=items[k].batch, embedding=flag(), pixels=flag(), gaussians=flag()))
    return jobs


def _assert_same_answers(expected, got) -> None:
    """Up to float rounding across batchings; pixels within one level."""
    for a, b in zip(expected, got):
        assert a.id == b.id and a.error is None and b.error is None, (a.error, b.error)
        for field in ("embedding", "features", "tubelets"):
            x, y = getattr(a, field), getattr(b, field)
            assert (x is None) == (y is None), field
            if x is not None and x.dtype == torch.uint8:
                assert y.dtype == torch.uint8 and y.shape == x.shape and (x.int() - y.int()).abs().max() <= 1
            elif x is not None:
                torch.testing.assert_close(y, x, rtol=1e-4, atol=2e-4)
        assert (a.tokens is None) == (b.tokens is None) and (a.gaussians is None) == (b.gaussians is None)
        assert (a.pool_state is None) == (b.pool_state is None)
        if a.tokens is not None:
            torch.testing.assert_close(b.tokens.latents, a.tokens.latents, rtol=1e-4, atol=2e-4)
        if a.gaussians is not None:
            torch.testing.assert_close(b.gaussians["xyz_raw"], a.gaussians["xyz_raw"], rtol=1e-4, atol=2e-4)


def test_random_mixes_of_jobs_get_the_in_process_answers(triton):
    """Batches of any mix the scheduler can form (images, videos and 3D; every op and flag)
    answer as the in-process worker does. An image's and a video's tokens decoded to pixels in
    one batch once failed the whole batch in Triton mode."""
    from service.triton_backend import TritonBackend

    local = LocalBackend(Settings(variant="tiny", dtype="float32").model_spec)
    local.start()
    remote = TritonBackend(triton.url)
    remote.start()
    items = _items()  # an image, a JPEG, a video tile, a 3D asset
    tokens = [r.tokens for r in local.run([Job(k, "tokenize", batch=item.batch) for k, item in enumerate(items)])]
    state = local.run([Job(0, "embed", batch=items[2].batch, partial=True)])[0].pool_state
    rng = np.random.default_rng(0)
    try:
        for _ in range(30):
            jobs = _random_jobs(rng, items, tokens, state, int(rng.integers(2, 9)))
            _assert_same_answers(local.run(jobs), remote.run(jobs))
    finally:
        remote.stop()
