"""What this machine is: its CPU's name, flags and clock, its memory, and the bandwidth one core streams at.

Read from ``/proc`` (with plain defaults elsewhere) and by a numpy streaming read. Both calibrations
(``autocompress.calibration``) and the profiles they fit use these; nothing here builds a model.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np

FLUSH_BYTES = 96 << 20  # > the L3 cache of any CPU we expect


class Flusher:
    """Evicts the CPU caches between timed runs, so weights are read from DRAM as in a real model."""

    def __init__(self) -> None:
        self.buf = np.ones(FLUSH_BYTES // 4, np.float32)

    def __call__(self) -> None:
        self.buf += 1.0


def read_bandwidth_GBps(flush: Flusher) -> float:
    """Give the best streaming-read bandwidth numpy reaches on one core (a sum over 256 MB)."""
    a = np.ones(64 << 20, np.float32)
    best = 0.0
    for _ in range(5):
        flush()
        start = time.perf_counter()
        a.sum()
        best = max(best, a.nbytes / (time.perf_counter() - start) / 1e9)
    return best


def cpu_name() -> str:
    """Give the CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """Give the CPU's feature flags (``avx512f``, ``avx_vnni``...); empty where ``/proc/cpuinfo`` is not readable."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_mhz() -> float:
    """Give the highest clock any core reports, in MHz (2500 where none does)."""
    try:
        mhz = [
            float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines() if "cpu MHz" in line
        ]
        return max(mhz) if mhz else 2500.0
    except (OSError, ValueError):
        return 2500.0


def meminfo_GB() -> tuple[float, float]:
    """Give (total, available) memory in GB (16 and 8 where ``/proc/meminfo`` is not readable)."""
    vals = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, rest = line.split(":", 1)
            vals[key] = float(rest.split()[0]) * 1024 / 1e9
    except (OSError, ValueError):
        return 16.0, 8.0
    return vals.get("MemTotal", 16.0), vals.get("MemAvailable", 8.0)


def flop_per_clock() -> float:
    """Give one core's fp32 FLOP per clock: two FMA pipes x 16 (AVX-512) or 8 (AVX2) lanes x 2."""
    return 64.0 if "avx512f" in cpu_flags() else 32.0


def int8_multiplier() -> float:
    """Give how many int8 dot-product operations one fp32 FLOP's slot does: 4 with VNNI, else 2."""
    return 4.0 if {"avx512_vnni", "avx_vnni"} & cpu_flags() else 2.0


def peaks(threads: int) -> tuple[float, float]:
    """Give the datasheet-style peaks (fp32 FLOP/s, int8 OP/s) of this CPU at ``threads`` threads."""
    fp32 = flop_per_clock() * cpu_mhz() * 1e6 * threads
    return fp32, fp32 * int8_multiplier()
