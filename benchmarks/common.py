"""Timing helpers shared by the benchmark scripts: median timing, matmul rate, peak memory.

On a shared machine single timings are noisy; compare variants measured in the same process, interleaved
(``interleaved_medians``), and read ratios rather than absolute figures.
"""
from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable, Mapping

import torch

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(seconds(fn) for _ in range(repeats))


def interleaved_medians(fns: Mapping[str, Callable[[], object]], repeats: int = 5) -> dict[str, float]:
    """Median seconds of each function, run round-robin (one call of each per round) so that a change of
    machine load hits every variant alike. Warm them up beforehand."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(seconds(fn))
    return {name: statistics.median(values) for name, values in times.items()}


def matmul_flops_per_second(dtype: torch.dtype = torch.float32, max_size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large square matrix multiply in ``dtype`` (2 n^3 FLOPs), median of repeats. The size
    doubles from 256 up to ``max_size`` while one product takes under 0.2 s, so that a slow (emulated)
    precision is still measured in seconds."""
    size = 256
    while True:
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        if size >= max_size or seconds(lambda a=a, b=b: a @ b) > 0.2:
            return 2 * size**3 / median_seconds(lambda a=a, b=b: a @ b, repeats=repeats)
        size *= 2


def rss_bytes() -> int:
    """Resident set size of this process now (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE_BYTES


class PeakRSS:
    """Highest resident set size of this process while the context is open, sampled by a thread.

    Torch releases the GIL in its kernels, so a 2 ms sampler sees the activations of a training step; the
    figure includes everything else the process holds (model, data, other variants' models).
    """

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
