"""The Triton wire format: a batch of mixed jobs packs into as few requests as their input
widths allow, and jobs and results come back out exactly as they went in."""

import numpy as np
import torch

from model.api import Tokens
from service.settings import Settings
from service.triton_io import inputs_to_jobs, outputs_to_results, pack_requests, results_to_outputs, unpack_json
from service.worker.backends import LocalBackend
from service.worker.jobs import Job, pixel_patches

RNG = np.random.default_rng(0)


def _jobs() -> list[Job]:
    image = pixel_patches(RNG.integers(0, 256, (1, 32, 48, 3), dtype=np.uint8))
    image2 = pixel_patches(RNG.integers(0, 256, (1, 16, 16, 3), dtype=np.uint8))
    video = pixel_patches(RNG.integers(0, 256, (4, 16, 32, 3), dtype=np.uint8))
    return [Job(10, "embed", batch=image, dense=True), Job(11, "reconstruct", batch=video, pixels=True),
            Job(12, "tokenize", batch=image2, mode="continuous"), Job(13, "reconstruct", batch=image)]


def test_requests_group_jobs_by_input_width_in_order():
    jobs = _jobs()
    requests = pack_requests(jobs)
    assert [positions for positions, _ in requests] == [[0, 2, 3], [1]]  # images (768 wide), the video (3072)
    for positions, arrays in requests:
        rows = sum(jobs[i].num_tokens for i in positions)
        assert arrays["PIXELS"].shape[:2] == (1, rows) and arrays["COORDS"].shape == (1, rows, 5)
        back = inputs_to_jobs(100, unpack_json(arrays["META"])["jobs"], arrays)
        assert [j.id for j in back] == list(range(100, 100 + len(positions)))
        for i, job in zip(positions, back):
            original = jobs[i]
            assert (job.op, job.mode, job.dense, job.pixels) == (original.op, original.mode, original.dense,
                                                                 original.pixels)
            assert torch.equal(job.batch.feats, original.batch.feats)
            assert torch.equal(job.batch.coords, original.batch.coords.to(torch.int32))


def test_results_travel_back_unchanged():
    backend = LocalBackend(Settings(variant="tiny", dtype="float32").model_spec)
    backend.start()
    jobs = _jobs()
    tokens = backend.run([jobs[2]])[0].tokens
    jobs.append(Job(14, "decode", tokens=Tokens(tokens.coords, tokens.kinds, latents=tokens.latents)))
    results = backend.run(jobs)
    for positions, arrays in pack_requests(jobs):
        own = [jobs[i] for i in positions]
        back = outputs_to_results(own, results_to_outputs([results[i] for i in positions]))
        for i, b in zip(positions, back):
            a = results[i]
            assert b.id == a.id and b.error == a.error
            for name in ("embedding", "features", "tubelets"):
                x, y = getattr(a, name), getattr(b, name)
                assert (x is None) == (y is None), name
                if x is not None:
                    assert x.dtype == y.dtype and torch.equal(x, y), name
            assert (a.tokens is None) == (b.tokens is None)
            if a.tokens is not None:
                assert torch.equal(a.tokens.latents, b.tokens.latents) and torch.equal(a.tokens.logvar, b.tokens.logvar)
    assert results[1].tubelets.dtype == torch.uint8 and results[3].tubelets.dtype == torch.float32


def test_pixels_of_images_and_videos_travel_in_requests_of_their_own():
    """An image's and a video's tokens to decode have inputs of one width, but their pixels come
    back 768 and 3072 wide: one request could not stack its answer (the model failed it)."""
    backend = LocalBackend(Settings(variant="tiny", dtype="float32").model_spec)
    backend.start()
    jobs = _jobs()
    image, video = (r.tokens for r in backend.run([Job(k, "tokenize", batch=jobs[k].batch) for k in (2, 1)]))
    jobs += [Job(14, "decode", tokens=image, pixels=True), Job(15, "decode", tokens=video, pixels=True),
             Job(16, "decode", tokens=image)]
    results = backend.run(jobs)
    assert all(r.error is None for r in results), [r.error for r in results]
    requests = pack_requests(jobs)
    assert [positions for positions, _ in requests] == [[0, 2, 3], [1], [4], [5], [6]]
    for positions, _ in requests:
        own = [jobs[i] for i in positions]
        for a, b in zip(outputs_to_results(own, results_to_outputs([results[i] for i in positions])),
                        (results[i] for i in positions)):
            assert (a.tubelets is None) == (b.tubelets is None)
            assert a.tubelets is None or torch.equal(a.tubelets, b.tubelets)


def test_only_outputs_some_job_has_travel():
    backend = LocalBackend(Settings(variant="tiny", dtype="float32").model_spec)
    backend.start()
    jobs = [Job(i, "embed", batch=pixel_patches(RNG.integers(0, 256, (1, 16, 32, 3), dtype=np.uint8)))
            for i in range(2)]
    results = backend.run(jobs)
    out = results_to_outputs(results)
    assert set(out) == {"EMBEDDING", "ERROR"}
    back = outputs_to_results(jobs, out)
    assert all(torch.equal(a.embedding, b.embedding) and b.tubelets is None for a, b in zip(results, back))


def test_the_in_flight_batches_setting_reaches_the_triton_backend(monkeypatch):
    from service.runtime import default_backend_factory
    from service.settings import Settings

    monkeypatch.setenv("ATOKEN_TRITON_INFLIGHT_BATCHES", "3")
    backend = default_backend_factory(Settings(worker="triton", triton_url="127.0.0.1:1"))()
    try:
        assert backend.max_inflight_batches == 3  # what the scheduler reads for its batch slots
    finally:
        backend.stop()


def test_a_slow_answer_waits_for_the_deadlines_not_the_clients_default(monkeypatch):
    """tritonclient's HTTP client gives up after 60 s by default and a failed request counts as a
    dead server, so the backend sets its own wait from the longest deadline (here 2 s + the
    margin). A server that accepts and never answers, against a wait of 0.5 s: WorkerDied."""
    import socket
    import time

    import pytest

    from service import triton_backend
    from service.runtime import default_backend_factory
    from service.triton_io import info_inputs
    from service.worker.backends import WorkerDied

    settings = Settings(worker="triton", triton_url="127.0.0.1:1", request_timeout_s=1.0, job_timeout_s=2.0)
    backend = default_backend_factory(settings)()
    assert backend.answer_timeout_s == 2.0 + triton_backend.ANSWER_MARGIN_S
    backend.stop()
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        for protocol in ("http", "grpc"):
            backend = triton_backend.TritonBackend(f"127.0.0.1:{silent.getsockname()[1]}", protocol,
                                                   shared_memory="off", answer_timeout_s=0.5)
            start = time.monotonic()
            try:
                with pytest.raises(WorkerDied):
                    backend._infer(info_inputs())
            finally:
                backend.stop()
            assert time.monotonic() - start < 30, protocol
