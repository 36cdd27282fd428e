"""Lowering a thread's CPU priority, so that the model's threads come first under contention.

Linux only, where nice values and SCHED_IDLE are per thread; elsewhere nothing. Idle cores are
still used in full: priority only orders contention. Imports nothing heavy (Ray's
pre-processing tasks use it and must not import torch)."""

from __future__ import annotations

import logging
import os
import sys
import threading

log = logging.getLogger("atoken.priority")


def lower_thread_priority(nice: int | None) -> None:
    """The calling thread `nice` levels (1-19; 0 or less: unchanged) below the process's main
    thread, at most 19 and never above where it is, or at idle priority (SCHED_IDLE: only what
    nothing else wants) when None. Relative, because the main thread may already be lowered:
    Ray starts its workers at nice 15, and an absolute nice 10 would put a decoding thread
    ahead of the model's own threads there. A refusal (a sandbox may forbid it) is logged,
    never raised: the work matters more than its priority."""
    if not sys.platform.startswith("linux") or (nice is not None and nice <= 0):
        return
    try:
        if nice is None:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return
        thread = threading.get_native_id()
        target = min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + nice)  # the pid names the main thread
        if target > os.getpriority(os.PRIO_PROCESS, thread):
            os.setpriority(os.PRIO_PROCESS, thread, target)
    except OSError as exc:
        log.warning("could not lower this thread's priority: %s", exc)
