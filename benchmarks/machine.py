"""What the benchmarks say about the machine they ran on: which CPU (the model's speed differs
4-5x between a CPU with bf16 units and one with AVX2 only), and the CPU a virtual machine's
hypervisor gave to other guests meanwhile (/proc/stat's steal). On the 2-core KVM guest of
docs/benchmarks/peers-avx2.md steal took from 2% to 45% of the CPU over a few seconds, and
moved the same server's rate with it (25 down to 11 requests/s), so benchmarks that compare
runs report it beside their figures.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def cpu_ticks() -> list[int]:
    """The machine's CPU time so far, all CPUs together, in clock ticks: /proc/stat's first
    line (user, nice, system, idle, iowait, irq, softirq, steal, ...); [] where unreadable."""
    try:
        return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return []


def stolen_s() -> float:
    """CPU seconds stolen since boot, all CPUs together; 0 where the kernel does not say."""
    ticks = cpu_ticks()
    return ticks[7] / TICK if len(ticks) > 7 else 0.0


def steal_pct(stolen: float, wall_s: float) -> float:
    """`stolen` CPU seconds over `wall_s` as a share (%) of the machine's CPU."""
    return 100 * stolen / (max(wall_s, 1e-9) * (os.cpu_count() or 1))


def describe() -> str:
    """'x86_64, 2 cores (AMD EPYC; AVX2, no bf16 units)': enough to tell which figures compare."""
    head = f"{platform.machine()}, {os.cpu_count()} cores"
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return head
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    units = ("AMX" if "amx_bf16" in flags else "AVX512-bf16" if "avx512_bf16" in flags
             else "AVX512, no bf16 units" if "avx512f" in flags else "AVX2, no bf16 units" if "avx2" in flags else "")
    return f"{head} ({'; '.join(x for x in (name, units) if x)})" if name or units else head
