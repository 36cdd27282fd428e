"""glibc keeps the model's large temporaries for reuse instead of faulting them in afresh."""

import os
import subprocess
import sys

import pytest

from service import allocator

# A pass's temporaries: six 4 MiB blocks held at once, all freed, again and again. glibc's
# default trims the freed top of its heap (over twice the largest block freed so far) and
# faults the pages in again on the next pass.
PASSES = """
import resource
import numpy as np
import service

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def one_pass():
    blocks = [np.ones(4 << 20, np.uint8) for _ in range(6)]
    del blocks

one_pass()
before = faults()
for _ in range(10):
    one_pass()
print((faults() - before) / 10)
"""
PAGES_PER_PASS = 6 * (4 << 20) // os.sysconf("SC_PAGE_SIZE")


def faults_per_pass(**env) -> float:
    out = subprocess.run([sys.executable, "-c", PASSES], env={**os.environ, **env}, check=True,
                         capture_output=True, text=True)
    return float(out.stdout)


@pytest.mark.skipif(not allocator.settle(), reason="glibc's malloc is not in use here")
def test_a_settled_process_reuses_its_freed_blocks():
    assert faults_per_pass() < 0.05 * PAGES_PER_PASS
    # glibc's own defaults, kept where the user sets them: every pass faults its blocks in again
    assert faults_per_pass(GLIBC_TUNABLES="glibc.malloc.check=0") > 0.2 * PAGES_PER_PASS


def test_glibc_settings_of_the_user_are_left_alone(monkeypatch):
    for name, value in (("MALLOC_MMAP_THRESHOLD_", "65536"), ("MALLOC_TRIM_THRESHOLD_", "0"),
                        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")):
        with monkeypatch.context() as m:
            m.setenv(name, value)
            assert allocator.configured_by_user() and not allocator.settle()
