"""Lanes: a batch cut into parts run side by side gives the one-pass numbers (up to the float
rounding of other matrix shapes), each result to its own job."""

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from model.patchify import frames_to_sparse
from service.settings import Settings
from service.worker.engine import Engine, LaneQueue, Lanes, chunks_by_cost, split_by_cost
from service.worker.jobs import Job, pixel_patches, voxel_patches
from service.worker.loader import ModelSpec, load_tokenizers
from tests.service.worker.results import assert_results_close


def _job(i: int, n: int, op: str = "embed") -> Job:
    rng = np.random.default_rng(i)
    return Job(i, op, batch=pixel_patches(rng.integers(0, 256, (1, 16 * n, 16, 3), dtype=np.uint8)))


@pytest.mark.parametrize("sizes,lanes", [([1, 1, 1, 1], 2), ([8, 1, 1, 1, 1, 1, 1, 1, 1], 2), ([3, 5, 2], 3),
                                         ([4], 4), ([1, 2, 3, 4, 5, 6, 7], 3), ([2, 2], 8)])
def test_split_by_cost_keeps_order_and_balances(sizes, lanes):
    jobs = [_job(i, n) for i, n in enumerate(sizes)]
    groups = split_by_cost(jobs, lanes)
    assert [j.id for g in groups for j in g] == list(range(len(jobs)))  # contiguous, in order, all there
    assert len(groups) == min(lanes, len(jobs)) and all(groups)
    costs = [sum(j.cost for j in g) for g in groups]
    # No group exceeds an equal share by more than its largest job.
    assert max(costs) <= sum(costs) / len(groups) + max(j.cost for j in jobs)


@pytest.mark.parametrize("sizes,cap", [([1, 1, 1, 1], 2), ([3, 1, 1, 2, 5], 4), ([], 4), ([6], 2)])
def test_chunks_by_cost_cap_each_pass_in_order(sizes, cap):
    jobs = [_job(i, n) for i, n in enumerate(sizes)]
    chunks = chunks_by_cost(jobs, cap)
    assert [j.id for c in chunks for j in c] == list(range(len(jobs))) and all(chunks)
    for chunk in chunks:  # within the cap, unless one job alone is over it
        assert sum(j.cost for j in chunk) <= cap or len(chunk) == 1
    for a, b in zip(chunks, chunks[1:]):  # greedy: the next job did not fit
        assert sum(j.cost for j in a) + b[0].cost > cap


@pytest.fixture(scope="module")
def tokenizers():
    return load_tokenizers(ModelSpec(variant="tiny"))


def test_lanes_give_the_numbers_of_one_pass(tokenizers):
    ramp = torch.linspace(-1, 1, 32)
    float_batch, _ = frames_to_sparse([torch.stack([ramp[:, None].expand(32, 32)] * 3, -1)])
    jobs = [_job(0, 2, "reconstruct"), _job(1, 1, "tokenize"), _job(2, 3, "embed"),
            Job(3, "reconstruct", batch=float_batch), _job(4, 2, "embed"), _job(5, 1, "reconstruct")]
    threads = torch.get_num_threads()
    try:
        one = Engine(tokenizers, lanes=1).run(jobs)
        three = Engine(tokenizers, lanes=3, threads=3).run(jobs)
    finally:
        torch.set_num_threads(threads)
    assert [r.id for r in three] == [j.id for j in jobs]
    assert_results_close(one, three, rtol=1e-4)


def test_a_reconstruction_sends_back_pixels_not_its_tokens():
    """A reconstruct job's tokens are an intermediate: they stay in the worker (at 256x256 they
    are half the bytes of the pixels), and its pixels are those of decoding a tokenize job's."""
    engine = Engine(load_tokenizers(Settings(variant=None).model_spec))  # the default: both modes
    for mode in ("continuous", "discrete"):
        job = _job(0, 2, "reconstruct")
        rec, tok = engine.run([Job(0, "reconstruct", mode=mode, batch=job.batch, pixels=True),
                               Job(1, "tokenize", mode=mode, batch=job.batch)])
        assert rec.error is None and rec.tokens is None and rec.tubelets.dtype == torch.uint8
        decoded = engine.run([Job(2, "decode", tokens=tok.tokens, pixels=True)])[0]
        torch.testing.assert_close(rec.tubelets, decoded.tubelets, rtol=0, atol=0)


def test_a_3d_item_decodes_to_its_voxels_features_alone_or_beside_a_video(tokenizers):
    """A 3D item's decoded rows are read for their first 768 values only (its PLY, npz and
    Gaussians): the decoder makes just those when every job in the pass is such, and a pass
    with whole tubelets (a video) hands the 3D item only its 768."""
    rng = np.random.default_rng(0)
    coords = np.unique(rng.integers(10, 40, (300, 3)), axis=0)
    voxels = voxel_patches(coords, rng.integers(0, 256, (len(coords), 768)).astype(np.float32) / 255)
    engine = Engine(tokenizers)
    voxel_tokens, video_tokens = (r.tokens for r in engine.run(
        [Job(0, "tokenize", batch=voxels), Job(1, "tokenize", batch=_video_job(2).batch)]))
    alone = engine.run([Job(2, "decode", tokens=voxel_tokens)])[0].tubelets
    beside = engine.run([Job(3, "decode", tokens=voxel_tokens), Job(4, "decode", tokens=video_tokens)])
    tok = tokenizers["continuous"]
    with torch.inference_mode():
        whole = tok.model.decode(tok.latent_batch(voxel_tokens)).float()  # the official decode: 3072 wide
    assert alone.shape == beside[0].tubelets.shape == (len(coords), 768)
    assert beside[1].tubelets.shape[1] == 3072
    torch.testing.assert_close(alone, whole[:, :768], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(beside[0].tubelets, whole[:, :768], rtol=1e-4, atol=1e-5)


def _video_job(i: int) -> Job:
    rng = np.random.default_rng(i)
    return Job(i, "embed", batch=pixel_patches(rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)))


def test_graphed_encoder_passes_give_the_eager_numbers_and_fall_back(tokenizers, caplog):
    """The engine's encoder passes through the bucketed encoder (on a GPU: CUDA graphs; here its
    padded eager twin) answer as eager passes do. Pieces of long videos, batches over every
    bucket, and every pass after a failed capture run eagerly."""
    from model.cuda_graphs import BucketedEncoder, GraphCaptureError

    tok = tokenizers["continuous"]
    jobs = [_job(0, 2, "reconstruct"), _job(1, 1, "tokenize"), _job(2, 3, "embed"), _job(4, 2, "embed")]
    jobs[3].dense = True
    eager = Engine(tokenizers)
    graphed = Engine(tokenizers)
    assert graphed.graphed == {id(tok): None}  # no CUDA here: auto stays eager
    bucketed = BucketedEncoder(tok.model, capture=False)
    calls = []
    encode = bucketed.encode
    bucketed.encode = lambda batch: calls.append(batch.num_tokens) or encode(batch)
    graphed.graphed[id(tok)] = bucketed
    assert_results_close(eager.run(jobs), graphed.run(jobs), rtol=1e-4, atol=1e-5)
    assert calls == [sum(j.num_tokens for j in jobs)]
    piece = [Job(5, "embed", batch=jobs[0].batch, partial=True)]
    torch.testing.assert_close(graphed.run(piece)[0].pool_state.weighted, eager.run(piece)[0].pool_state.weighted)
    bucketed.buckets = [(1, 1)]  # nothing fits
    assert_results_close(eager.run(jobs[:1]), graphed.run(jobs[:1]))
    assert len(calls) == 1

    def broken(batch):
        raise GraphCaptureError("CUDA graph capture of bucket (1, 256) failed: no")

    bucketed.buckets, bucketed.encode = [(32, 8192)], broken
    with caplog.at_level("WARNING", logger="atoken.worker"):
        assert_results_close(eager.run(jobs), graphed.run(jobs), rtol=1e-4, atol=1e-5)
    assert graphed.graphed[id(tok)] is None and "run eagerly" in caplog.text


def test_cuda_graphs_on_without_cuda_is_a_config_error(tokenizers):
    from model.cuda_graphs import graphed_encoder, set_cuda_graphs
    from model.errors import ConfigError

    try:
        set_cuda_graphs("off")
        assert graphed_encoder(tokenizers["continuous"].model) is None
        set_cuda_graphs("on")
        with pytest.raises(ConfigError, match="CUDA"):
            graphed_encoder(tokenizers["continuous"].model)
    finally:
        set_cuda_graphs("auto")


def test_a_bad_job_fails_alone_in_its_lane(tokenizers):
    bad = Job(1, "embed", batch=pixel_patches(np.zeros((1, 16, 16, 3), np.uint8)))
    bad.batch = bad.batch.with_feats(bad.batch.feats[:, :5])  # wrong patch width
    jobs = [_job(0, 1), bad, _job(2, 1), _job(3, 1)]
    results = Engine(tokenizers, lanes=2).run(jobs)
    assert [r.id for r in results] == [0, 1, 2, 3]
    assert results[1].error is not None
    assert all(r.error is None and r.embedding is not None for k, r in enumerate(results) if k != 1)


def test_long_video_pieces_pool_through_lanes(tokenizers):
    video = pixel_patches(np.random.default_rng(7).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    engine = Engine(tokenizers, lanes=2)
    pieces = engine.run([Job(0, "embed", batch=video, partial=True), Job(1, "embed", batch=video)])
    assert pieces[0].error is None and pieces[0].pool_state is not None
    pooled = engine.run([Job(2, "pool", pool_state=pieces[0].pool_state)])[0]
    assert pooled.error is None
    torch.testing.assert_close(pooled.embedding, pieces[1].embedding, rtol=1e-4, atol=1e-5)


def test_no_jobs_no_results(tokenizers):
    assert Engine(tokenizers, lanes=2).run([]) == []


def test_tokens_alone_skip_the_pooling_head_and_keep_their_numbers(tokenizers):
    """A batch of tokenize jobs that want no embedding runs without the pooling head; its tokens
    are those of a batch that pools, and an embedding asked for is the embed job's."""
    engine = Engine(tokenizers)

    def tokenize(embedding: bool) -> list:
        return engine.run([Job(i, "tokenize", batch=_job(i, n).batch, embedding=embedding)
                           for i, n in enumerate([2, 1, 3])])

    bare, pooled = tokenize(False), tokenize(True)
    embedded = engine.run([_job(i, n) for i, n in enumerate([2, 1, 3])])
    for b, p, e in zip(bare, pooled, embedded):
        assert b.embedding is None and b.pool_state is None
        torch.testing.assert_close(b.tokens.latents, p.tokens.latents, rtol=0, atol=0)
        torch.testing.assert_close(p.embedding, e.embedding)


class _Recorder:
    """A LaneQueue `run` that records each call's items and holds it until its item's gate opens."""

    def __init__(self):
        self.runs: list[list[str]] = []
        self.gates: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def __call__(self, items: list[str]) -> None:
        with self._lock:
            self.runs.append(list(items))
        gate = self.gates.get(items[0])
        if gate is not None:
            gate.wait(10)

    def hold(self, *names: str) -> None:
        for name in names:
            self.gates[name] = threading.Event()

    def wait_for(self, count: int) -> None:
        deadline = time.monotonic() + 10
        while len(self.runs) < count and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(self.runs) >= count, self.runs


def _lanes(n: int = 2) -> Lanes:
    return Lanes(SimpleNamespace(threads=n), n)  # run_lane is never called: the queue's `run` is the test's


def _both_lanes_busy(limit: int) -> tuple[Lanes, _Recorder, LaneQueue]:
    """A queue on two lanes, each computing a held item ("a", "b") put one after the other."""
    lanes, run = _lanes(), _Recorder()
    run.hold("a", "b")
    queue = LaneQueue(lanes, run, cap=100, limit=limit)
    queue.put(["a"], [10])
    run.wait_for(1)
    queue.put(["b"], [10])
    run.wait_for(2)
    return lanes, run, queue


def test_lane_queue_joins_what_comes_while_every_lane_computes():
    lanes, run, queue = _both_lanes_busy(limit=1000)
    for name in "cde":  # one at a time, as Triton's batcher hands them over
        queue.put([name], [10])
    time.sleep(0.05)
    assert run.runs == [["a"], ["b"]]  # nothing more starts while both lanes compute
    run.gates["a"].set()
    run.wait_for(3)
    assert run.runs[2] == ["c", "d", "e"]  # one pass when a lane frees, not three
    run.gates["b"].set()
    queue.close()
    lanes.close()


def test_lane_queue_shares_a_burst_between_idle_lanes_and_caps_each_pass():
    lanes, run = _lanes(), _Recorder()
    run.hold("a", "c")
    queue = LaneQueue(lanes, run, cap=100, limit=1000)
    queue.put(list("abcd"), [10] * 4)
    run.wait_for(2)
    assert sorted(run.runs) == [["a", "b"], ["c", "d"]]
    run.gates["a"].set()
    run.gates["c"].set()
    queue.put(list("efgh"), [60, 60, 150, 10])  # at most the cap, at least one item
    queue.close()
    lanes.close()
    assert sorted(run.runs[2:]) == [["e"], ["f"], ["g"], ["h"]]  # 60 + 60 passes the cap; 150 goes alone


def test_lane_queue_holds_the_caller_when_its_limit_is_queued():
    lanes, run, queue = _both_lanes_busy(limit=20)
    queue.put(["c", "d"], [10, 10])  # the limit, queued
    third = threading.Thread(target=queue.put, args=(["e"], [10]))
    third.start()
    third.join(0.2)
    assert third.is_alive()  # waits while the limit is queued
    run.gates["a"].set()
    third.join(10)
    assert not third.is_alive()
    run.gates["b"].set()
    queue.close()
    lanes.close()
    assert sorted(x for r in run.runs for x in r) == list("abcde")  # each once


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_engine_replays_captured_graphs():
    from model.cuda_graphs import set_cuda_graphs
    from model.layers.attention import flash_available

    if not flash_available():
        pytest.skip("flash-attn not installed")
    tokenizers = load_tokenizers(ModelSpec(variant="tiny", device="cuda", dtype="bfloat16"))
    jobs = [Job(i, "embed", batch=_job(i, n).batch) for i, n in enumerate([2, 1, 3])]
    graphed = Engine(tokenizers)
    assert graphed.graphed[id(tokenizers["continuous"])] is not None
    try:
        set_cuda_graphs("off")
        eager = Engine(tokenizers)
    finally:
        set_cuda_graphs("auto")
    for _ in range(2):  # capture, then replay
        got = graphed.run(jobs)
    for a, b in zip(eager.run(jobs), got):
        assert b.error is None and torch.nn.functional.cosine_similarity(a.embedding, b.embedding, dim=0) > 0.999
