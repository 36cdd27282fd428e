"""glibc's malloc, set once per process to reuse the model's large temporaries.

glibc serves a block of at least `M_MMAP_THRESHOLD` with a fresh `mmap`, which faults in
every page on first touch and returns them on free. The threshold starts at 128 KiB and
rises only after such a block is freed, up to 32 MiB (its ceiling on 64-bit), with the
trim threshold at twice that. A model pass makes and frees temporaries of 0.1-16 MB, so
whether it reuses them or faults them in afresh each pass depends on the process's history:
the same default-model pass took 6.9 or 10.1 ms a 256x256 image in different processes,
each process steadily one or the other (docs/performance.md). Fixing both thresholds at
that ceiling makes every process the fast kind; memory held is what glibc's own rule holds
once it has freed one 32 MiB block.

Setting `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_` or a `glibc.malloc` tunable in
`GLIBC_TUNABLES` leaves glibc as configured."""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 64 << 20


def configured_by_user() -> bool:
    return ("MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ
            or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""))


def settle() -> bool:
    """Fixes the thresholds where glibc's malloc is in use; False where it is not, or left."""
    if not sys.platform.startswith("linux") or configured_by_user():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # a libc without mallopt
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
