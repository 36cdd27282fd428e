"""The local engine's read-ahead: results in input order, and decoding never runs further
ahead of the model than its item window and its token budget allow."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from service.bulk.prepare import prepare
from service.bulk.run import ReadAhead, held_tokens
from service.bulk.sources import Entry
from service.inputs import Options
from service.media.limits import MediaLimits
from tests import assets

N = 40


def _run(consume_delay: float, **kw) -> tuple[list[int], int]:
    """Squares of 0..N-1 read ahead through 4 threads by a slow consumer; returns them and the
    most results ever started but not yet consumed."""
    lock, started, consumed, peak = threading.Lock(), [0], [0], [0]

    def fn(i: int) -> int:
        with lock:
            started[0] += 1
            peak[0] = max(peak[0], started[0] - consumed[0])
        return i * i

    out = []
    with ThreadPoolExecutor(4) as pool:
        for value in ReadAhead(pool, fn, range(N), parallel=4, **kw):
            time.sleep(consume_delay)  # a slow model: decoding would run ahead if allowed
            with lock:
                consumed[0] += 1
            out.append(value)
    return out, peak[0]


def test_results_in_input_order():
    out, _ = _run(0.0, window=8)
    assert out == [i * i for i in range(N)]


def test_runs_ahead_while_the_consumer_is_busy():
    # the consumer takes 10 ms an item, ample time for the others to finish: the window of 8
    # fills (up to 8, +1: the item in its hands) though the consumer asks for nothing meanwhile:
    # only 4 start at first, the rest are started by the ones finishing
    out, peak = _run(0.01, window=8)
    assert out == [i * i for i in range(N)]
    assert 4 + 1 < peak <= 8 + 1


def test_weight_budget_bounds_what_is_held():
    # every result weighs 10: with a budget of 30, a fourth finished result stops new starts,
    # so at most 3 waiting + 4 running (started before the budget filled) + the item in the
    # consumer's hands are ever held
    out, peak = _run(0.01, window=N, weight=lambda _: 10, budget=30)
    assert out == [i * i for i in range(N)]
    assert 3 <= peak <= 3 + 4 + 1


def test_an_item_that_raises_reaches_the_consumer():
    def fn(i: int) -> int:
        if i == 3:
            raise ValueError("bad input 3")
        return i

    got = []
    with ThreadPoolExecutor(2) as pool:
        try:
            for value in ReadAhead(pool, fn, range(10), window=4, parallel=2, weight=lambda v: v, budget=5):
                got.append(value)
        except ValueError as exc:
            assert "bad input 3" in str(exc)
    assert got == [0, 1, 2]


def test_a_stopped_pool_ends_reading_ahead_quietly():
    pool = ThreadPoolExecutor(2)
    reader = iter(ReadAhead(pool, lambda i: i, range(100), window=8, parallel=2))
    assert next(reader) == 0
    pool.shutdown(wait=True, cancel_futures=True)  # the engine stops mid-run
    rest = list(reader)  # what had started still arrives; nothing new starts, nothing raises
    # At most a window: consuming item 0 freed a slot, so items 1-8 may all have started (and,
    # on a quick machine, finished) before the shutdown; none after it.
    assert rest == list(range(1, 1 + len(rest))) and len(rest) <= 8


def test_a_video_waiting_to_run_weighs_its_file(tmp_path):
    """The local engine's read-ahead budget counts a video (decoded only when it runs) by the
    compressed bytes it holds, as image token rows of the same size, not as nothing."""
    data = assets.clip_with_audio(1.5)
    path = tmp_path / "talk.mp4"
    path.write_bytes(data)
    video = prepare(Entry("talk.mp4", str(path), size=len(data)), Options(), MediaLimits(max_side=128))
    assert held_tokens(video) == -(-len(data) // 768) > 0
