"""Lowering a thread's priority: only the calling thread changes, and a refusal never stops
the work."""

import logging
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.priority import lower_thread_priority
from tests.conftest import ROOT

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities are Linux's")


def _own_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@linux_only
def test_only_the_calling_thread_changes():
    def nice_then_read() -> int:
        lower_thread_priority(10)
        return _own_nice()

    def idle_then_read() -> int:
        lower_thread_priority(None)
        return os.sched_getscheduler(0)

    before = _own_nice()
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(nice_then_read).result() == min(19, before + 10)
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(idle_then_read).result() == os.SCHED_IDLE
    assert _own_nice() == before
    assert os.sched_getscheduler(0) != os.SCHED_IDLE


@linux_only
def test_levels_count_from_the_main_thread_never_above_it():
    """Ray starts its workers at nice 15: a decoding thread 10 levels below the model's is at 19
    there, not at 10, ahead of the model. Twice over, it stays where it is (a pool thread may
    start another, which inherits its nice)."""
    code = """
import os, threading
from concurrent.futures import ThreadPoolExecutor
from service.priority import lower_thread_priority
from tests.conftest import ROOT
os.nice(15)
def twice():
    lower_thread_priority(10)
    lower_thread_priority(10)
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
with ThreadPoolExecutor(1) as pool:
    print(pool.submit(twice).result())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["19"], out.stderr


@linux_only
def test_zero_leaves_the_thread_alone():
    def zero_then_read() -> int:
        lower_thread_priority(0)
        return _own_nice()

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(zero_then_read).result() == _own_nice()


@linux_only
def test_a_refusal_is_logged_not_raised(monkeypatch, caplog):
    def refuse(*_):
        raise PermissionError("not in this sandbox")

    monkeypatch.setattr(os, "setpriority", refuse)
    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    with caplog.at_level(logging.WARNING, logger="atoken.priority"):
        lower_thread_priority(10)
        lower_thread_priority(None)
    assert sum("not in this sandbox" in r.getMessage() for r in caplog.records) == 2


def _nice_of(prefix: str, besides: set[int]) -> set[int]:
    """The nice values of this process's threads named `prefix`..., other than those in `besides`
    (threads that earlier tests' servers left)."""
    return {os.getpriority(os.PRIO_PROCESS, t.native_id) for t in threading.enumerate()
            if t.name.startswith(prefix) and t.native_id not in besides}


@linux_only
@pytest.mark.parametrize("nice", [None, 5])
def test_front_end_threads_run_at_the_front_end_nice(nice):
    """The event loop and the decoding threads it starts run at ATOKEN_FRONTEND_NICE (default 0:
    the model's priority, since the model's batches are what they produce); the dispatcher,
    which feeds the worker, never lower."""
    from tests import assets
    from tests.service.server import LiveServer

    base = _own_nice()
    earlier = {t.native_id for t in threading.enumerate()}
    with LiveServer(**({} if nice is None else {"frontend_nice": nice})) as live:
        with live.client() as c:
            image = assets.image("rocket.jpg")
            assert c.post("/encode", files={"file": (image.name, image.read_bytes())}).status_code == 200
        expected = base if nice is None else max(base, nice)
        assert _nice_of("atoken-pre", earlier) == {expected}
        assert _nice_of("atoken-dispatcher", earlier) == {base}
        loop_thread = live.thread.native_id
        assert os.getpriority(os.PRIO_PROCESS, loop_thread) == expected
