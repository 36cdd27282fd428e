"""The process worker with one batch per lane in flight: batches side by side give the numbers
of one batch at a time, each answer to its own caller, and a worker that dies fails every
batch it held, quickly."""

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import pytest

from service.worker.backends import ProcessBackend, WorkerDied
from service.worker.jobs import Job, pixel_patches
from service.worker.loader import ModelSpec
from tests.service.worker.results import assert_results_close

SPEC = ModelSpec(variant="tiny", dtype="float32", threads=2)


def _batch(first: int, n: int, op: str, side: int = 32) -> list[Job]:
    rng = np.random.default_rng(first)
    return [Job(first + i, op, batch=pixel_patches(rng.integers(0, 256, (1, side, side + 16, 3), dtype=np.uint8)))
            for i in range(n)]


def _cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def backends():
    calibration: dict = {}  # as one front end's workers share it: the second reuses the first's speed
    one, two = ProcessBackend(SPEC, slots=1, calibration=calibration), ProcessBackend(SPEC, slots=2,
                                                                                    calibration=calibration)
    one.start()
    two.start()
    yield one, two
    one.stop()
    two.stop()


def test_batches_side_by_side_give_the_numbers_of_one_at_a_time(backends):
    one, two = backends
    batches = [_batch(10 * k, n, op) for k, (n, op) in
               enumerate([(1, "embed"), (3, "reconstruct"), (2, "tokenize"), (1, "reconstruct"), (4, "embed")])]
    expected = [one.run(b) for b in batches]
    with ThreadPoolExecutor(4) as pool:  # more callers than slots: they take turns
        got = list(pool.map(two.run, batches))
    for batch, a, b in zip(batches, expected, got):
        assert [r.id for r in b] == [j.id for j in batch]  # each caller gets its own batch back
        if len(batch) > 1:  # a lane of its own, one thread
            assert {r.extra["threads"] for r in b} == {1}
        assert_results_close(a, b)


def test_a_lone_job_on_an_idle_worker_runs_on_every_thread(backends):
    _, two = backends
    for k in range(3):  # a lane has one thread; a lone job on an idle worker takes both
        result = two.run(_batch(100 + k, 1, "embed"))
        assert result[0].error is None and result[0].extra["threads"] == 2


def test_a_batch_arriving_while_a_long_lone_job_runs_is_not_held_behind_it(backends):
    """A lone job runs on every thread on the worker's main thread; the next batch goes to a lane
    meanwhile. The pipe used to be read by that thread, so a 24 ms image waited for a 3D asset's
    whole pass (12.2 s)."""
    _, two = backends
    long_job = _batch(200, 1, "reconstruct", side=1024)  # 4,160 tokens, both passes: 1.4 s here
    finished = {}

    def run(name, jobs):
        result = two.run(jobs)[0]
        assert result.error is None
        finished[name] = (time.monotonic(), result.extra["threads"])

    started = time.monotonic()
    long_run = threading.Thread(target=run, args=("long", long_job))
    long_run.start()
    time.sleep(0.2)  # the long job is on the main thread by now
    run("short", _batch(201, 1, "embed"))
    long_run.join(60)
    assert finished["long"][1] == 2 and finished["short"][1] == 1  # every thread; a lane's one
    assert finished["short"][0] < finished["long"][0], (
        f"short done at {finished['short'][0] - started:.2f} s, long at {finished['long'][0] - started:.2f} s")


def test_a_worker_that_dies_fails_every_batch_it_held(backends):
    two = ProcessBackend(SPEC, slots=2)
    two.start()
    try:
        big = [_batch(200, 8, "reconstruct", 512), _batch(300, 8, "reconstruct", 512)]  # seconds each
        errors: list[BaseException] = []

        def run(batch):
            try:
                two.run(batch)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(b,)) for b in big]
        for t in threads:
            t.start()
        busy_from = _cpu_s(two.pid)
        while _cpu_s(two.pid) < busy_from + 0.5:  # both batches sent and running
            time.sleep(0.02)
        os.kill(two.pid, signal.SIGKILL)
        start = time.monotonic()
        for t in threads:
            t.join(10)
        assert not any(t.is_alive() for t in threads), "a batch was left waiting on a dead worker"
        assert time.monotonic() - start < 5
        assert len(errors) == 2 and all(isinstance(e, WorkerDied) for e in errors)
        with pytest.raises(WorkerDied):
            two.run(_batch(400, 1, "embed"))
    finally:
        two.stop()


def _spawned_children() -> set[int]:
    pids = set()
    for task in os.listdir("/proc/self/task"):
        for pid in open(f"/proc/self/task/{task}/children").read().split():
            try:
                if b"spawn_main" in open(f"/proc/{pid}/cmdline", "rb").read():
                    pids.add(int(pid))
            except OSError:
                continue
    return pids


def test_a_worker_killed_while_starting_is_reported_as_such():
    backend = ProcessBackend(SPEC, slots=2)
    before = _spawned_children()
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(_try(backend.start)))
    thread.start()
    deadline = time.monotonic() + 30
    while not (new := _spawned_children() - before):  # it is importing torch: a second or more
        assert time.monotonic() < deadline and thread.is_alive(), "no worker was started"
        time.sleep(0.005)
    os.kill(new.pop(), signal.SIGKILL)
    thread.join(30)
    assert isinstance(outcome[0], WorkerDied) and "exited during start-up" in str(outcome[0]), outcome
    backend.stop()


def _try(fn):
    try:
        return fn()
    except BaseException as exc:  # noqa: BLE001
        return exc


def test_the_speed_is_timed_on_what_is_served():
    """Calibration times an image as the front end sends it (uint8 frame patches, the frame's
    pixels back; a 3D asset's voxels travel the same 768 values a token), not float tubelets
    four frames wide: those would time projections of zero frames no request has."""
    from service.worker import backends as module
    from service.worker.engine import Engine
    from service.worker.loader import load_tokenizers

    tokenizers = load_tokenizers(SPEC)
    engine = Engine(tokenizers, 1, 1)
    seen = []
    run = engine.run
    engine.run = lambda jobs: seen.extend(jobs) or run(jobs)
    work = module.calibrate(engine, module.attention_crossover(module.describe(tokenizers)["encoder"]), 1.0)
    assert work["per_s"] > 0 and work["decoder_pass"] >= 1
    assert {j.op for j in seen} == {"tokenize", "reconstruct"}
    for job in seen:
        assert job.batch.feats.dtype == torch.uint8 and job.batch.feats.shape == (1024, 768)
        assert job.pixels == (job.op == "reconstruct") and job.tubelet_width in (0, 768)


def test_a_worker_started_after_another_reuses_its_measured_speed(backends):
    one, two = backends
    assert one.calibration is two.calibration and one.calibration["work"] == one.info["work"]
    assert two.info["work"] == one.info["work"]  # timed again, the rate would differ in its last digits


def test_given_a_measured_speed_a_worker_does_not_time_passes_again(monkeypatch):
    from service.worker import backends as module
    from service.worker.engine import Engine
    from service.worker.loader import load_tokenizers

    tokenizers = load_tokenizers(SPEC)
    engine = Engine(tokenizers, 1, 1)
    work = {"per_s": 1234.5, "decoder_pass": 1.1, "attention_crossover": 3000.0}
    monkeypatch.setattr(module, "calibrate", lambda *a, **k: pytest.fail("timed again"))
    assert module.ready_info(engine, tokenizers, work)["work"] == work


def test_an_untimed_backend_starts_without_timing_passes(monkeypatch):
    """For callers that read no speed (bulk tokenization, the CLI): the canary still runs the
    model, no passes are timed, and no `work` is reported or shared."""
    from service.worker import backends as module

    monkeypatch.setattr(module, "calibrate", lambda *a, **k: pytest.fail("timed"))
    backend = module.LocalBackend(SPEC, timed=False)
    assert "work" not in backend.start() and backend.calibration == {}
    assert backend.run(_batch(0, 1, "tokenize"))[0].error is None


def test_passes_slower_than_the_timing_budget_are_timed_once():
    """Where the first pass of each op already outlasts the budget (a large model, an emulated
    dtype), those passes are the measurement: no further pairs are run."""
    from service.worker import backends as module

    class Slow:
        def __init__(self):
            self.ops: list[str] = []

        def run(self, jobs):
            self.ops += [j.op for j in jobs]
            time.sleep(module.CALIBRATION_S * (0.4 if jobs[0].op == "tokenize" else 0.8))
            return []

    slow = Slow()
    work = module.calibrate(slow, 3000.0, 0.0)
    assert slow.ops == ["tokenize", "reconstruct"]
    assert work["decoder_pass"] == pytest.approx(1.0, abs=0.1)  # 0.8 / 0.4 - 1
    per_s = module.WorkPrice(3000.0)(Job(0, "tokenize", batch=pixel_patches(np.zeros((1, 512, 512, 3), np.uint8))))
    assert work["per_s"] == pytest.approx(per_s / (0.4 * module.CALIBRATION_S), rel=0.1)
