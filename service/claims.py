"""Files claimed with a lock for as long as their owner lives (shared memory in /dev/shm: the
model worker's arenas, the front end's Triton regions, a Triton server's own regions). The
kernel drops an flock when the last descriptor holding it closes, however its process died,
so whoever finds a claim unlocked knows its owner is gone and may free what it left.
Imports nothing heavy: the Triton launcher and its container entry point use it."""

from __future__ import annotations

import fcntl
import os
import threading
from typing import Callable


def create_claimed(path: str, prepare: Callable[[int, str], None] | None = None) -> int:
    """The file at `path`, new, and a descriptor holding its lock. Made and locked under a
    private name, `prepare(fd, name)`d there, then linked into place: nobody scanning for
    abandoned claims ever finds it unlocked. Raises OSError (and `prepare`'s errors)."""
    staging = f"{path}.{os.getpid()}.{threading.get_ident()}.new"
    fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # just created: nobody else holds it
        if prepare:
            prepare(fd, staging)
        os.link(staging, path)  # never over another's claim
    except BaseException:
        os.close(fd)
        raise
    finally:
        unlink(staging)
    return fd


def abandoned(path: str) -> int | None:
    """A descriptor holding `path`'s lock if nobody else held it (its owner is gone), else None
    (alive, or no such file). The caller frees what the owner left, then closes it."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
